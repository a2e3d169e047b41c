"""``scio bench`` in a minimal install: every missing data package listed at once, no traceback."""

from __future__ import annotations

import pytest

import scio.bench.cli as bench_cli
from scio.cli import main
from scio.datasets import DatasetNotFoundError


def _missing_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_cli, "find_spec", lambda name: None)

    def no_fashion() -> None:
        raise DatasetNotFoundError("absent")

    monkeypatch.setattr("scio.datasets.fashion.fashion_mnist_dir", no_fashion)


def test_bench_lists_every_missing_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    _missing_everything(monkeypatch)
    assert main(["bench", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert "Traceback" not in captured.err + captured.out
    assert (
        "scio bench cannot run: missing mlxtend, animal-mnist, scikit-learn, scikit-image, "
        "Fashion-MNIST (dataset-fashion-mnist)." in err
    )
    assert 'Install the Python packages with: pip install "scio[bench]"' in err
    assert "apt-get install -y dataset-fashion-mnist" in err


def test_bench_near_protocol_needs_only_fashion_mnist(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _missing_everything(monkeypatch)
    assert main(["bench", "--protocol", "near"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "missing Fashion-MNIST (dataset-fashion-mnist)." in err
    assert "scio[bench]" not in err


def test_bench_help_says_how_to_install(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert 'pip install "scio[bench]"' in out
    assert "dataset-fashion-mnist" in out


def test_bench_extra_lists_the_far_ood_packages() -> None:
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extra = " ".join(pyproject["project"]["optional-dependencies"]["bench"])
    for _, dist in bench_cli._FAR_PACKAGES:
        assert dist in extra
