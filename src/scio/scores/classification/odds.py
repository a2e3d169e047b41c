"""Odds ("The Odds are Odd"): z-scores of noise-induced logit-difference shifts."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch, validate_labels
from scio.scores.core.input_grad import check_max_batch
from scio.scores.core.validation import ParamRange, param_ranges
from scio.utils.enums import ZAggr, ZAggrLike

__all__ = ["Odds"]

#: Input elements of one noisy forward pass by default (``max_batch=None``), at least one copy.
_MAX_NOISY_ELEMENTS = 2**22
#: Elements of one ``(chunk, C, C)`` z-score block at inference.
_MAX_Z_ELEMENTS = 2**24


def _upcast(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _splits_exactly(device: torch.device) -> bool:
    """Whether ``rand(a + b)`` equals ``cat(rand(a), rand(b))`` for a generator on ``device``
    (true for torch's sequential CPU generator, not for counter-based CUDA generators)."""
    return device.type == "cpu"


class _NoiseStream:
    """The noise ``ε · (1 - 2·U)`` of consecutive noisy copies, drawn in a fixed order.

    With ``block=None`` each :meth:`take` draws exactly the copies it returns (the generator
    splits draws exactly); otherwise draws are made ``block`` copies at a time (one
    sample's copies) and handed out piecewise, so the values never depend on how the copies
    are chunked.
    """

    def __init__(
        self,
        epsilon: float,
        inputs: Tensor,
        generator: torch.Generator | None,
        block: int | None,
    ) -> None:
        self.epsilon, self.generator, self.block = epsilon, generator, block
        self.shape, self.dtype, self.device = inputs.shape[1:], inputs.dtype, inputs.device
        self._buffer: Tensor | None = None
        self._used = 0

    def _draw(self, copies: int) -> Tensor:
        shape = (copies, *self.shape)
        if self.generator is None:
            u = torch.rand(shape, dtype=self.dtype, device=self.device)
        else:
            u = torch.rand(
                shape, generator=self.generator, dtype=self.dtype, device=self.generator.device
            )
        return (self.epsilon * (1 - 2 * u)).to(self.device)

    def take(self, copies: int) -> Tensor:
        """Noise of the next ``copies`` copies, ``(copies, *sample_shape)``."""
        if self.block is None:
            return self._draw(copies)
        parts = []
        while copies > 0:  # off CPU only: one draw per sample
            if self._buffer is None or self._used == len(self._buffer):
                self._buffer, self._used = self._draw(self.block), 0
            part = self._buffer[self._used : self._used + copies]
            self._used += len(part)
            copies -= len(part)
            parts.append(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Odds(StreamingCalibration, BaseScoreClassif):
    """The Odds are Odd (Roth, Kilcher & Hofmann, "The Odds are Odd: A Statistical Test
    for Detecting Adversarial Examples", ICML 2019).

    Idea: adding small random noise to a natural input shifts its logit differences in a
    way that is typical of its class; inputs whose shifts are atypical (adversarial or OoD)
    are detected with z-scores of these shifts.

    Formula: with ``f_{y,z}(x) = logit_z(x) - logit_y(x)`` and noise
    ``η = ε · (1 - 2·U[0,1))`` (same shape as the input), ``g_{y,z} = f_{y,z}(x+η) -
    f_{y,z}(x)``. Calibration estimates, for each true class ``y``, the mean ``μ[y, z]`` and
    unbiased variance ``σ²[y, z]`` of ``g_{y,z}`` over ``noise_samples`` noisy copies of
    every calibration sample of class ``y``. At inference, ``Δ = E_η[logits(x+η)] -
    logits(x)`` (empirical mean over ``noise_samples`` draws), ``g[y, z] = Δ_z - Δ_y`` and
    ``z[y, z] = (g - μ) / σ²`` (divided by the variance, as in the reference). For each
    candidate class ``y``, z-scores are aggregated over ``z ≠ y``: ``sum``, ``detect``
    (max) or ``rectify`` (min); conformity ``= -aggregate`` (NaN → ``-inf``, so classes
    absent from calibration get ``-inf``).

    Randomness: at each fit a generator on the calibration device is seeded with
    ``rng_seed`` (``None``: torch's global RNG); its state after calibration is the fitted
    attribute ``rng_state``, and every inference call starts a generator from that state (the
    fitted score is read-only: concurrent calls give exactly the sequential results, and two
    calls on the same inputs give the same conformities; the reference instead keeps
    consuming one generator, see ``docs/compatibility.md``). The noise of sample ``i`` is one
    contiguous block of ``noise_samples`` draws, taken in sample order, at calibration and at
    inference, so
    neither the caller's batches nor ``max_batch`` change the noise: on CPU each forward
    chunk draws exactly its copies (torch's CPU generator splits draws exactly); on other
    devices one draw is made per sample (counter-based generators do not split). With
    ``rng_seed=None`` this holds only if nothing else uses the global RNG meanwhile (e.g. a
    shuffling ``DataLoader``). The noise order differs from the reference's class-by-class
    draws (same distribution).

    Args:
        epsilon: noise amplitude (uniform in ``[-ε, ε]``).
        noise_samples: noisy copies per sample (``> 0``).
        z_aggregation: ``"sum"``, ``"detect"`` or ``"rectify"``.
        rng_seed: seed of the noise generator (``None``: global RNG).
        max_batch: noisy copies per forward pass (``None``: as many as fit in ``2**22``
            input elements, at least one). Changing it keeps the score fit and changes no
            noise value; ``repr`` shows it only when set.

    Cost: ``noise_samples`` extra forward passes' worth of compute, at calibration and at
    inference (time linear in ``noise_samples``), run on chunks of ``max_batch`` copies of
    the flattened (sample, copy) axis, each reduced at once: peak memory is one chunk's
    forward plus ``O(n · C)`` running sums, independent of ``noise_samples``. Calibration
    keeps only per-class running sums in float64 (``3 · C²`` values), never activations or
    inputs; inference accumulates the noisy logits per sample in float64 and builds
    ``(n, C, C)`` z-scores by chunks.
    """

    epsilon: float
    noise_samples: int = 256
    z_aggregation: ZAggrLike = "sum"
    rng_seed: int | None = 0
    max_batch: int | None = None

    _fitted_attrs = ("avg", "var", "rng_state", "rng_device")
    _extension_params = BaseScoreClassif._extension_params | {"max_batch"}
    _keeps_fit = frozenset({"max_batch"})  # a memory bound only

    _param_ranges = param_ranges(
        epsilon=ParamRange(math.isfinite, "a finite number"),
        noise_samples=ParamRange.interval(0, integer=True),
    )

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        ZAggr(self.z_aggregation)
        check_max_batch(self.max_batch)

    # -- noise --------------------------------------------------------------------------------
    def _noisy_chunks(
        self, inputs: Tensor, generator: torch.Generator | None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """For consecutive chunks of the ``n · noise_samples`` noisy copies (sample-major):
        the sample index of each copy and the copies' logits."""
        n_copies = self.noise_samples
        per_pass = self.max_batch
        if per_pass is None:
            numel = max(1, inputs[0].numel()) if len(inputs) else 1
            per_pass = max(1, _MAX_NOISY_ELEMENTS // numel)
        device = inputs.device if generator is None else generator.device
        block = None if _splits_exactly(device) else n_copies
        noise = _NoiseStream(self.epsilon, inputs, generator, block)
        total = len(inputs) * n_copies
        for start in range(0, total, per_pass):
            stop = min(start + per_pass, total)
            rows = torch.arange(start, stop, device=inputs.device) // n_copies
            noisy = inputs.index_select(0, rows) + noise.take(stop - start)
            yield rows, self.rnet(noisy, dont_record=True)

    # -- calibration ----------------------------------------------------------------------------
    def _calib_start(self) -> None:
        super()._calib_start()
        self._calib_rng: torch.Generator | None = None

    def _calib_update(self, batch: CalibBatch) -> None:
        out = batch.out
        n_classes = out.shape[1]
        labels = validate_labels(batch.labels, len(batch), n_classes).to(out.device)
        if self.rng_seed is not None and self._calib_rng is None:
            self._calib_rng = torch.Generator(batch.inputs.device).manual_seed(self.rng_seed)
        clean = out.to(torch.float64)
        sums = torch.zeros((n_classes, n_classes), dtype=torch.float64, device=out.device)
        squares = torch.zeros_like(sums)
        for rows, logits in self._noisy_chunks(batch.inputs, self._calib_rng):
            rows = rows.to(out.device)
            copy_labels = labels[rows]
            delta = logits.to(torch.float64) - clean[rows]  # (copies, C)
            g = delta - delta.gather(1, copy_labels.unsqueeze(1))
            sums.index_add_(0, copy_labels, g)
            squares.index_add_(0, copy_labels, g.square())
        counts = torch.bincount(labels, minlength=n_classes).to(torch.float64)
        self._state.add("count", counts * self.noise_samples)
        self._state.add("sum", sums)
        self._state.add("sum_sq", squares)

    def _calib_end(self) -> None:
        count = self._state.sum("count").unsqueeze(1)
        total = self._state.sum("sum")
        mean = total / count  # NaN rows for absent classes
        var = (self._state.sum("sum_sq") - total * mean) / (count - 1)
        self.avg: Tensor = mean
        self.var: Tensor = var.clamp(min=0)
        rng = self._calib_rng
        del self._calib_rng
        self.rng_state: Tensor | None = None if rng is None else rng.get_state()
        self.rng_device: str | None = None if rng is None else str(rng.device)

    # -- inference ----------------------------------------------------------------------------
    @property
    def _acts_on_inputs(self) -> bool:
        return True

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        kind = ZAggr(self.z_aggregation)
        if kind not in (ZAggr.SUM, ZAggr.DETECT, ZAggr.RECTIFY):
            msg = f"Unsupported z-aggregation scheme: {kind!r}"
            raise ValueError(msg)
        out = self.rnet(inputs, dont_record=True)
        generator = None
        if self.rng_state is not None:
            assert self.rng_device is not None
            generator = torch.Generator(self.rng_device)
            generator.set_state(self.rng_state)
        n_classes = out.shape[1]
        noisy_sum = torch.zeros((len(out), n_classes), dtype=torch.float64, device=out.device)
        for rows, logits in self._noisy_chunks(inputs, generator):
            noisy_sum.index_add_(0, rows.to(out.device), logits.to(torch.float64))
        dtype = _upcast(out.dtype)
        delta = (noisy_sum / self.noise_samples).to(dtype) - out.to(dtype)  # (n, C)
        avg = self.avg.to(device=out.device, dtype=dtype)
        var = self.var.to(device=out.device, dtype=dtype)
        diagonal = torch.eye(n_classes, dtype=torch.bool, device=out.device)
        fill = {ZAggr.SUM: 0.0, ZAggr.DETECT: -math.inf, ZAggr.RECTIFY: math.inf}[kind]
        chunk = max(1, _MAX_Z_ELEMENTS // max(1, n_classes * n_classes))
        parts = []
        for start in range(0, len(delta), chunk):
            d = delta[start : start + chunk]
            g = d.unsqueeze(1) - d.unsqueeze(2)  # g[i, y, z] = Δ_z - Δ_y
            z = ((g - avg) / var).masked_fill(diagonal, fill)
            if kind == ZAggr.SUM:
                parts.append(z.sum(dim=2))
            elif kind == ZAggr.DETECT:
                parts.append(z.amax(dim=2))
            else:
                parts.append(z.amin(dim=2))
        aggregate = torch.cat(parts) if parts else delta.new_zeros((0, n_classes))
        conformity = torch.where(aggregate.isnan(), -math.inf, 0.0 - aggregate)
        return out, conformity.to(out.dtype)
