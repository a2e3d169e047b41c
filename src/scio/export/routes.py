"""The serving routes of an exported score: ``torch.export`` programs and ONNX files.

Both start from :func:`~scio.export.as_module` and keep the batch dimension free
(``torch.export.Dim``); both refuse, with the reason, scores that cannot be one graph
(input gradients, extra network passes on transformed inputs) and networks that
``torch.export`` cannot trace. :func:`export_onnx` checks the file with ONNX Runtime against
the eager module before it is written (nothing is written beyond tolerance).
"""

from __future__ import annotations

import math
import os
import re
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scio.export.errors import ExportError
from scio.export.module import ScoreModule, as_module
from scio.scores.core.base import BaseScore

__all__ = [
    "DEFAULT_MAX_BATCH",
    "Difference",
    "compare",
    "export_onnx",
    "export_program",
    "onnx_runner",
    "random_batch",
    "save_program",
]

#: Largest batch size an exported graph accepts by default (``torch.export.Dim`` bound).
DEFAULT_MAX_BATCH = 1 << 16
#: Batch sizes of the ONNX Runtime check (a single sample and an odd batch).
CHECK_BATCHES = (1, 37)
_ONNX_INSTALL = 'pip install "scio[export]" (onnx, onnxscript, onnxruntime)'


@dataclass(frozen=True)
class Difference:
    """Largest differences between two ``(out, conformity)`` pairs.

    Attributes:
        max_abs: largest ``|a - b|`` over the finite entries of both outputs.
        max_rel: largest ``|a - b| / |b|`` over the entries where the relative tolerance
            dominates (``rtol |b| >= atol``; ``b`` the reference).
        mismatched: entries where one is NaN or infinite and the other is not the same.
        excess: largest ``|a - b| - (atol + rtol |b|)`` (``<= 0``: within tolerance).
    """

    max_abs: float
    max_rel: float
    mismatched: int
    excess: float

    @property
    def ok(self) -> bool:
        """Whether the outputs agree within the tolerance they were compared with."""
        return self.mismatched == 0 and self.excess <= 0

    def __str__(self) -> str:
        text = f"largest difference {self.max_abs:.3g} (relative {self.max_rel:.3g})"
        if self.mismatched:
            text += f", {self.mismatched} non-finite entries differ"
        return text


def compare(
    actual: Sequence[Tensor], expected: Sequence[Tensor], *, atol: float = 1e-4, rtol: float = 1e-4
) -> Difference:
    """Compare ``actual`` with ``expected`` (e.g. ``(out, conformity)`` pairs) entrywise:
    ``|a - b| <= atol + rtol |b|``, NaN and infinities equal only to themselves."""
    max_abs = max_rel = 0.0
    excess = -math.inf
    mismatched = 0
    for a, b in zip(actual, expected, strict=True):
        a = torch.as_tensor(a).detach().to(device="cpu", dtype=torch.float64)
        b = torch.as_tensor(b).detach().to(device="cpu", dtype=torch.float64)
        if a.shape != b.shape:
            msg = f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}"
            raise ValueError(msg)
        finite = a.isfinite() & b.isfinite()
        mismatched += int((~finite & ~((a == b) | (a.isnan() & b.isnan()))).sum())
        if bool(finite.any()):
            diff = (a - b).abs()[finite]
            scale = b.abs()[finite]
            max_abs = max(max_abs, float(diff.max()))
            excess = max(excess, float((diff - (atol + rtol * scale)).max()))
            relative = rtol * scale >= atol  # where the relative tolerance dominates
            if bool(relative.any()):
                max_rel = max(max_rel, float((diff[relative] / scale[relative]).max()))
    return Difference(max_abs, max_rel, mismatched, excess)


def random_batch(
    module: ScoreModule, n: int, *, seed: int = 0, input_shape: Sequence[int] | None = None
) -> Tensor:
    """``n`` uniform ``[0, 1)`` inputs of the module's calibration shape, dtype and device."""
    shape = module.input_shape if input_shape is None else tuple(input_shape)
    if shape is None:
        msg = "The score's input shape is unknown: pass `input_shape`"
        raise ValueError(msg)
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=generator, dtype=dtype).to(device)


def _module(score: ScoreModule | BaseScore) -> ScoreModule:
    return score if isinstance(score, ScoreModule) else as_module(score)


def _first_export_error(exc: BaseException) -> ExportError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ExportError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _reason(exc: BaseException) -> str:
    """The first line of an exception, or the operator ONNX has no translation for."""
    text = str(exc)
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if missing:
        return f"ONNX has no translation of the operator {missing.group(1)}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    head = lines[0] if lines else ""
    return f"{type(exc).__name__}: {head}"[:500]


def export_program(
    score: ScoreModule | BaseScore,
    example: Tensor,
    *,
    dynamic_batch: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the score's module with a free batch dimension.

    Args:
        score: a fitted score or its :func:`~scio.export.as_module` module.
        example: an example batch (its size does not matter with ``dynamic_batch``; use at
            least 2 samples, as ``torch.export`` specialises sizes 0 and 1).
        dynamic_batch: keep the batch dimension symbolic (``1 <= n <= max_batch``).

    Raises:
        ExportError: the score needs input gradients or extra network passes, or
            ``torch.export`` cannot trace it (the message gives the reason).
    """
    module = _module(score)
    blocker = module.export_blocker(example)
    if blocker is not None:
        raise ExportError(blocker)
    dynamic = None
    if dynamic_batch:
        dynamic = ({0: torch.export.Dim("batch", min=1, max=max_batch)},)
    try:
        return torch.export.export(module, (example,), dynamic_shapes=dynamic)
    except Exception as exc:
        known = _first_export_error(exc)
        if known is not None:
            raise known from None
        msg = (
            f"torch.export cannot trace {module.score_name} with its network "
            f"({_reason(exc)}); the eager module from `as_module(score)` still works"
        )
        raise ExportError(msg) from exc


def onnx_runner(path: str | os.PathLike[str]) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """A function running the ONNX file at ``path`` with ONNX Runtime (CPU) on a tensor."""
    try:
        import onnxruntime
    except ImportError as exc:
        msg = f"Running ONNX files needs onnxruntime: {_ONNX_INSTALL}"
        raise ImportError(msg) from exc
    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> tuple[Tensor, ...]:
        outputs = session.run(None, {name: x.detach().cpu().numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)

    return run


def _cdist(x1: Tensor, x2: Tensor, p: float, compute_mode: int | None = None) -> Tensor:
    """``torch.cdist`` by explicit differences (ONNX has no cdist)."""
    return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), ord=p, dim=-1)


def _searchsorted(
    sorted_sequence: Tensor,
    values: Tensor,
    *,
    out_int32: bool = False,
    right: bool = False,
    side: str | None = None,
    sorter: Tensor | None = None,
) -> Tensor:
    """``torch.searchsorted`` by counting (ONNX has no searchsorted): the number of entries
    ``s`` with ``not s >= v`` (``not s > v`` on the right side), which is torch's binary
    search on a sequence without NaN (NaN values go last, as in torch)."""
    if sorter is not None:
        sorted_sequence = sorted_sequence.gather(-1, sorter)
    right = right or side == "right"
    if sorted_sequence.ndim == 1:
        seq, query = sorted_sequence, values.unsqueeze(-1)
    else:
        seq, query = sorted_sequence.unsqueeze(-2), values.unsqueeze(-1)
    below = ~(seq > query) if right else ~(seq >= query)
    return below.sum(dim=-1).to(torch.int32 if out_int32 else torch.int64)


def _onnx_decompositions() -> dict[Any, Callable[..., Tensor]]:
    """The default decompositions, plus ops ONNX lacks written with ops it has."""
    table = dict(torch.export.default_decompositions())
    table[torch.ops.aten._cdist_forward.default] = _cdist
    table[torch.ops.aten.searchsorted.Tensor] = _searchsorted
    return table


def _check_onnx_installed() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        msg = f"ONNX export needs {', '.join(missing)}: {_ONNX_INSTALL}"
        raise ImportError(msg)


Reference = Callable[[Tensor], Sequence[Tensor]]


def _check(
    run: Reference,
    module: ScoreModule,
    reference: Reference | None,
    batches: Sequence[int],
    input_shape: tuple[int, ...],
    atol: float,
    rtol: float,
    what: str,
) -> dict[int, Difference]:
    """Compare ``run`` with ``reference`` (default: the eager module) on random batches;
    raise :class:`ExportError` beyond tolerance."""
    expected_of = module if reference is None else reference
    differences = {}
    for size in batches:
        x = random_batch(module, size, seed=size, input_shape=input_shape)
        differences[size] = compare(run(x), expected_of(x), atol=atol, rtol=rtol)
    failed = {n: d for n, d in differences.items() if not d.ok}
    if failed:
        detail = "; ".join(f"batch {n}: {d}" for n, d in failed.items())
        msg = (
            f"{what} disagrees with {module.score_name} beyond atol={atol}, rtol={rtol} "
            f"({detail}): nothing written"
        )
        raise ExportError(msg)
    return differences


def _written(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(target, temporary path next to it)``: files are written whole or not at all."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target, target.with_name(f".scio-{uuid.uuid4().hex}-{target.name}")  # same suffix


def save_program(
    score: ScoreModule | BaseScore,
    example: Tensor,
    path: str | os.PathLike[str],
    *,
    check: bool = True,
    reference: Reference | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    check_batches: Sequence[int] = CHECK_BATCHES,
) -> dict[int, Difference]:
    """Write :func:`export_program`'s program (free batch) with ``torch.export.save``.

    With ``check``, the program runs on random batches of ``check_batches`` sizes and is
    compared with ``reference`` (default: the eager module, e.g. the score itself); the file
    is written only if every difference is within ``atol + rtol |expected|``.

    Returns:
        ``{batch size: Difference}`` of the check (empty without ``check``).

    Raises:
        ExportError: the score cannot be exported, or the check failed (nothing written).
    """
    module = _module(score)
    program = export_program(module, example)
    differences: dict[int, Difference] = {}
    if check:
        differences = _check(
            program.module(),
            module,
            reference,
            check_batches,
            tuple(example.shape[1:]),
            atol,
            rtol,
            "The exported program",
        )
    target, tmp = _written(path)
    try:
        torch.export.save(program, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return differences


def export_onnx(
    score: ScoreModule | BaseScore,
    example: Tensor,
    path: str | os.PathLike[str],
    *,
    check: bool = True,
    reference: Reference | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    check_batches: Sequence[int] = CHECK_BATCHES,
) -> dict[int, Difference]:
    """Write the score and its network as one ONNX graph (``torch.onnx``, dynamo exporter,
    free batch dimension), input ``x``, outputs ``out`` and ``conformity``.

    With ``check``, ONNX Runtime runs the file on random batches of ``check_batches``
    sizes and compares with ``reference`` (default: the eager module, e.g. the score
    itself; :func:`compare`); the file is written only if every difference is within
    ``atol + rtol |expected|`` (activations computed by ONNX Runtime differ from torch's by
    a few float32 rounding units, which a distance of a few hundred turns into ~1e-4).

    Returns:
        ``{batch size: Difference}`` of the check (empty without ``check``).

    Raises:
        ImportError: onnx/onnxscript (or onnxruntime for the check) are not installed.
        ExportError: the score cannot be exported (see :func:`export_program`), or the
            check failed; nothing is written.
    """
    _check_onnx_installed()
    module = _module(score)
    program = export_program(module, example)
    with warnings.catch_warnings():  # torch-internal deprecation noise (LeafSpec)
        warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
        program = program.run_decompositions(_onnx_decompositions())
    target, tmp = _written(path)
    try:
        try:
            with warnings.catch_warnings():  # torch-internal deprecation noise (LeafSpec)
                warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
                torch.onnx.export(
                    program,
                    (),
                    tmp,
                    dynamo=True,
                    external_data=False,
                    input_names=["x"],
                    output_names=["out", "conformity"],
                    verbose=False,
                )
        except Exception as exc:
            msg = f"torch.onnx cannot export {module.score_name} ({_reason(exc)})"
            raise ExportError(msg) from exc
        differences: dict[int, Difference] = {}
        if check:
            differences = _check(
                onnx_runner(tmp),
                module,
                reference,
                check_batches,
                tuple(example.shape[1:]),
                atol,
                rtol,
                "ONNX Runtime",
            )
        os.replace(tmp, target)
        return differences
    finally:
        tmp.unlink(missing_ok=True)
