"""The README's torchrun example runs (2 CPU processes, gloo) and checks itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "distributed_calibration.py"


def _readme_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## Calibrating on many GPUs/processes\n(.*?)\n## ", readme, re.S)
    assert match, "README section missing"
    return match.group(1)


def test_readme_snippet_is_the_example_code() -> None:
    code = re.findall(r"```python\n(.*?)```", _readme_section(), re.S)[0]
    source = EXAMPLE.read_text(encoding="utf-8")
    for line in code.strip().splitlines():
        assert line.split("  #")[0].strip() in source, line


@pytest.mark.slow
def test_torchrun_example_runs_on_cpu(tmp_path: Path) -> None:
    command = re.findall(r"```bash\n(.*?)```", _readme_section(), re.S)[0].split()
    assert command[0] == "torchrun"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run(
        [str(torchrun), *command[1:]],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 1: 501 samples, fitted on 1001" in result.stdout
    for name in ("KNN", "DeepMahalanobis", "ReAct"):
        assert f"{name}: distributed fit equals single-process fit: True" in result.stdout
