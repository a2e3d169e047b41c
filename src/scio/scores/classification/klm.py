"""KLM: KL divergence to the nearest class-mean posterior (KL matching)."""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch

__all__ = ["KLM", "kl_to_templates", "posterior_templates"]

_F64 = torch.float64


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def posterior_templates(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per predicted class, ``(sum of softmax posteriors, count)`` in float64.

    ``(n, C)`` logits -> ``(C, C)`` sums (row ``k``: samples predicted as ``k``) and ``(C,)``
    counts; both are running sums (mergeable across batches).
    """
    probs = torch.softmax(logits.to(_F64), dim=1)
    pred = logits.argmax(dim=1)
    n_classes = logits.shape[1]
    sums = torch.zeros(n_classes, n_classes, dtype=_F64, device=logits.device)
    sums.index_add_(0, pred, probs)
    counts = torch.bincount(pred, minlength=n_classes).to(_F64)
    return sums, counts


def kl_to_templates(logits: Tensor, log_templates: Tensor) -> Tensor:
    """``KL(p || d_k) = sum_c p_c (log p_c - log d_kc)`` for every template ``k``.

    ``(n, C)`` logits (``p = softmax``) and ``(K, C)`` log-templates -> ``(n, K)``, in the
    working dtype of the logits (float32 for half precision). One matrix product.
    """
    work = logits.to(_work_dtype(logits.dtype))
    log_p = torch.log_softmax(work, dim=1)
    p = log_p.exp()
    neg_entropy = (p * log_p).sum(dim=1, keepdim=True)
    return neg_entropy - p @ log_templates.to(device=work.device, dtype=work.dtype).T


class KLM(StreamingCalibration, BaseScoreClassif):
    """KL matching (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
    Settings", ICML 2022).

    Idea: for each class ``k``, the typical posterior of in-distribution inputs predicted as
    ``k`` is a template ``d_k``; an input whose posterior matches no template (in KL
    divergence) is out-of-distribution. Unlike the maximum softmax probability it uses the
    whole shape of the posterior (e.g. the usual confusions between similar classes).

    Formula: at calibration (labels unused, as in the paper) ``d_k = mean{softmax(z(x')) :
    argmax z(x') = k}``; conformity = ``-min_k KL(p || d_k)`` with ``p = softmax(z)``, the
    direction of the paper (test posterior first), one value per sample shared by every class.

    Classes that no calibration sample is predicted as have no template: a ``UserWarning``
    names them and the minimum runs over the other templates (documented fallback; the
    fitted ``template_classes`` lists the classes that have one).

    Args:
        act_norm: unused (no recorded layer is read).
        mode: see :class:`~scio.scores.classification.base.BaseScoreClassif`.

    Cost: calibration reads the logits of the shared forward and keeps float64 running sums
    (``C × C`` posterior sums, ``C`` counts). Inference: one plain forward and one
    ``(n × C)·(C × K)`` product (float32, float64 for float64 networks). Fitted state:
    ``templates`` (``K × C`` float64), ``log_templates`` (their logarithm, floored at the
    smallest float64) and ``template_classes`` (``K`` int64).
    """

    _fitted_attrs: ClassVar[tuple[str, ...]] = ("templates", "log_templates", "template_classes")

    def _calib_update(self, batch: CalibBatch) -> None:
        sums, counts = posterior_templates(batch.out)
        self._state.add("posterior_sums", sums)
        self._state.add("counts", counts)

    def _calib_end(self) -> None:
        counts = self._state.sum("counts")
        present = counts > 0
        absent = (~present).nonzero().flatten().tolist()
        if absent:
            warnings.warn(
                f"KLM: no calibration sample is predicted as class(es) {absent}: they get no "
                "template and the minimum KL divergence runs over the other classes",
                UserWarning,
                stacklevel=5,
            )
        templates = self._state.sum("posterior_sums")[present] / counts[present, None]
        self.templates: Tensor = templates
        self.log_templates: Tensor = templates.clamp(min=torch.finfo(_F64).tiny).log()
        self.template_classes: Tensor = present.nonzero().flatten()

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs, dont_record=True)
        kl = kl_to_templates(out, self.log_templates)
        return out, -kl.amin(dim=1).to(out.dtype)
