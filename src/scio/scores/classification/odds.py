"""Odds ("The Odds are Odd"): z-scores of noise-induced logit-difference shifts."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scio.scores.base import StreamingCalibration
from scio.scores.calibration import CalibBatch, validate_labels
from scio.scores.classification.base import BaseScoreClassif
from scio.utils.enums import ZAggr, ZAggrLike
from scio.utils.misc import check

__all__ = ["Odds"]

#: Input elements of one noisy forward pass (chunks hold at least one sample's copies).
_MAX_NOISY_ELEMENTS = 2**22
#: Elements of one ``(chunk, C, C)`` z-score block at inference.
_MAX_Z_ELEMENTS = 2**24


def _upcast(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _splits_exactly(device: torch.device) -> bool:
    """Whether ``rand(a + b)`` equals ``cat(rand(a), rand(b))`` for a generator on ``device``
    (true for torch's sequential CPU generator, not for counter-based CUDA generators)."""
    return device.type == "cpu"


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
    ``rng_seed`` (``None``: torch's global RNG); it keeps being consumed at inference (its
    state is the fitted attribute ``rng_state``, so two calls on the same inputs draw
    different noise, as in the reference). The noise of calibration sample ``i`` is one
    contiguous block of ``noise_samples`` draws, taken in sample order, so fitting from
    batches gives exactly the noise of fitting from one tensor (on CPU one draw per chunk
    of samples, which torch's CPU generator splits exactly; on other devices one draw per
    sample, since counter-based generators do not). With ``rng_seed=None`` this holds only
    if nothing else uses the global RNG meanwhile (e.g. a shuffling ``DataLoader``). The
    noise order differs from the reference's class-by-class draws (same distribution).

    Args:
        epsilon: noise amplitude (uniform in ``[-ε, ε]``).
        noise_samples: noisy copies per sample (``> 0``).
        z_aggregation: ``"sum"``, ``"detect"`` or ``"rectify"``.
        rng_seed: seed of the noise generator (``None``: global RNG).

    Cost: ``noise_samples`` extra forward passes' worth of compute, at calibration and at
    inference, run in chunks of at most ``2**22`` input elements (at least one sample's
    copies). Calibration keeps only per-class running sums in float64 (``3 · C²`` values),
    never activations or inputs; inference builds ``(n, C, C)`` z-scores by chunks.
    """

    epsilon: float
    noise_samples: int = 256
    z_aggregation: ZAggrLike = "sum"
    rng_seed: int | None = 0

    _fitted_attrs = ("avg", "var", "rng_state", "rng_device")

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        check(self.noise_samples > 0)
        ZAggr(self.z_aggregation)

    # -- noise --------------------------------------------------------------------------------
    def _noise(
        self, inputs: Tensor, generator: torch.Generator | None, *, per_sample: bool
    ) -> Tensor:
        """``ε · (1 - 2·U)`` for ``noise_samples`` copies of each sample, sample-major."""
        shape = (self.noise_samples, *inputs.shape[1:])
        dtype = inputs.dtype
        if generator is None:
            u = torch.rand((len(inputs), *shape), dtype=dtype, device=inputs.device)
        elif per_sample and not _splits_exactly(generator.device):
            u = torch.stack(
                [
                    torch.rand(shape, generator=generator, dtype=dtype, device=generator.device)
                    for _ in range(len(inputs))
                ]
            )
        else:
            u = torch.rand(
                (len(inputs), *shape), generator=generator, dtype=dtype, device=generator.device
            )
        noise = self.epsilon * (1 - 2 * u)
        return noise.to(inputs.device).flatten(0, 1)

    def _noisy_logits(
        self, inputs: Tensor, generator: torch.Generator | None, *, per_sample: bool
    ) -> Tensor:
        """Logits of the noisy copies ``(n, noise_samples, C)``, by chunks of samples."""
        per_sample_elements = self.noise_samples * max(1, inputs[0].numel() if len(inputs) else 1)
        chunk = max(1, _MAX_NOISY_ELEMENTS // per_sample_elements)
        parts = []
        for start in range(0, len(inputs), chunk):
            x = inputs[start : start + chunk]
            noisy = x.repeat_interleave(self.noise_samples, dim=0)
            noisy = noisy + self._noise(x, generator, per_sample=per_sample)
            logits = self.rnet(noisy, dont_record=True)
            parts.append(logits.reshape(len(x), self.noise_samples, -1))
        return torch.cat(parts)

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
        noisy = self._noisy_logits(batch.inputs, self._calib_rng, per_sample=True)
        delta = noisy.to(torch.float64) - out.to(torch.float64).unsqueeze(1)  # (n, S, C)
        g = delta - delta.gather(2, labels.view(-1, 1, 1).expand(-1, delta.shape[1], 1))
        sums = torch.zeros((n_classes, n_classes), dtype=torch.float64, device=out.device)
        squares = torch.zeros_like(sums)
        sums.index_add_(0, labels, g.sum(dim=1))
        squares.index_add_(0, labels, g.square().sum(dim=1))
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
        noisy = self._noisy_logits(inputs, generator, per_sample=False)
        if generator is not None:
            self.rng_state = generator.get_state()
        dtype = _upcast(out.dtype)
        delta = noisy.to(dtype).mean(dim=1) - out.to(dtype)  # (n, C)
        n_classes = out.shape[1]
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
