"""The "Inferring with Confidence" tutorial as a parametrised function (``scio demo``)."""

from __future__ import annotations

import rich
import torch
from rich.console import Console

__all__ = ["parse_layer", "run_demo"]


def parse_layer(text: str) -> tuple[int, int] | str:
    """Parse ``"1,11"`` / ``"1-11"`` / ``"(1, 11)"`` into ``(1, 11)``; keep module names."""
    cleaned = text.strip().strip("()").replace("-", ",")
    parts = [part.strip() for part in cleaned.split(",")]
    if len(parts) == 2 and all(part.lstrip("-").isdigit() for part in parts):
        return int(parts[0]), int(parts[1])
    return text.strip()


def run_demo(
    *,
    n_calib: int = 10,
    n_test: int = 5,
    k: int | None = None,
    layer: tuple[int, int] | str = (1, 11),
    seed: int | None = 0,
    console: Console | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the tutorial: Tiniest model, ``KNN`` on the feature maps, timer report.

    Calibration and test inputs are uniform noise, as in the reference tutorial; ``k``
    defaults to the rule of thumb ``int(n_calib ** 0.4)``. Returns ``(out, conformity)``.
    """
    from scio.models import CIFAR10_CLASSES, tiniest
    from scio.recorder import Recorder
    from scio.scores import KNN

    console = console or Console()
    if n_calib < 1 or n_test < 1:
        msg = f"`n_calib` and `n_test` must be positive (got {n_calib}, {n_test})"
        raise ValueError(msg)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sample_shape = (3, 32, 32)
    calib_data = torch.rand(n_calib, *sample_shape, generator=generator)
    calib_labels = torch.randint(0, 10, (n_calib,), generator=generator)
    net = tiniest().to(calib_data)

    score = KNN(k=k if k is not None else max(int(n_calib**0.4), 1))
    rnet = Recorder(net, input_data=calib_data[[0]])
    console.print(repr(rnet), highlight=False, markup=False, soft_wrap=True)
    rnet.record(layer)
    name = rnet.layer_names[rnet.recording[0]]
    console.print(f"Recording layer {rnet.recording[0]} ({name!r})", markup=False)
    console.print(repr(score.fit(rnet, calib_data, calib_labels)), highlight=False, markup=False)

    test_data = torch.rand(n_test, *sample_shape, generator=generator)
    out, conformity = score(test_data)
    preds = out.argmax(1)
    confs = conformity[:, 0]  # KNN is constant across classes
    for i, (pred, conf) in enumerate(zip(preds, confs, strict=True)):
        console.print(
            f"Sample {i}: predicted {CIFAR10_CLASSES[int(pred)]} with confidence {float(conf)}",
            highlight=False,
            markup=False,
        )
    table = score.timer._report_table()
    if table is not None:
        console.print(table)
    else:  # pragma: no cover - a fitted and called score always has stats
        rich.print("No timing recorded")
    return out, conformity
