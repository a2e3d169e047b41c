"""``ConformalDetector``: reject inputs as OoD with a guaranteed false-alarm rate.

The detector turns fitted classification scores into a decision. On a holdout of
in-distribution inputs the scores never saw, it stores the conformity at the predicted
class; the conformal p-value of a new input is ``(1 + #{i : s_i <= s(x)}) / (n + 1)``, and
flagging ``p <= alpha`` rejects an in-distribution input with probability at most ``alpha``
(marginally over the holdout draw, for exchangeable data; Bates et al., "Testing for
outliers with conformal p-values", Annals of Statistics 2023). The math lives in
:mod:`scio.decision.pvalues`; this module is the plumbing (network passes, state, files).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from scio.decision import pvalues as P
from scio.decision.files import DetectorFileError, read_detector, save_detector
from scio.scores.core.base import BaseScore
from scio.scores.core.calibration import as_batches
from scio.scores.core.fitted import fitted_scores

__all__ = ["MIN_HOLDOUT", "ConformalDetector", "DetectorFileError"]

#: Fewest holdout inputs ``fit`` accepts (per class in class-conditional mode): with 19, the
#: smallest p-value is 1/20, so ``alpha = 0.05`` can flag an input.
MIN_HOLDOUT = 19

_STATE = ("holdout_conformities_", "holdout_classes_", "n_classes_")

PathLike = str | os.PathLike[str]


def _infer(scores: Sequence[BaseScore], inputs: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``[s(inputs) for s in scores]``, one shared forward when the scores share a network."""
    if len(scores) > 1 and all(s.rnet.net is scores[0].rnet.net for s in scores):
        from scio.scores.joint.inference import infer_jointly

        return infer_jointly(scores, inputs)
    return [score(inputs) for score in scores]


def _at_predicted(out: Tensor, conformity: Tensor) -> Tensor:
    """Conformity at the predicted class ``out.argmax(1)`` (class-independent: as is)."""
    if conformity.ndim == 2:
        return conformity.gather(1, out.argmax(1, keepdim=True)).squeeze(1)
    return conformity.reshape(len(out))


class ConformalDetector:
    """Flag inputs as out-of-distribution with a guaranteed in-distribution rejection rate.

    Args:
        scores: one fitted classification score, or a list of them combined into one test.
        combine: how several scores' p-values become one: ``"bonferroni"`` (``K min p``) or
            ``"harmonic"`` (``e ln K`` times the harmonic mean, Vovk & Wang 2020); both are
            valid whatever the dependence between the scores.
        class_conditional: compare an input only with the holdout inputs of its predicted
            class: the bound then holds within every predicted class (Mondrian conformal).
        randomize: break ties between conformities at random (exactly uniform p-values).
        seed: seed of the tie-breaking generator (created at ``fit``).

    Example::

        det = ConformalDetector(score).fit(holdout)
        flags = det.predict(x, alpha=0.05)  # P(an in-distribution input is flagged) <= 0.05
    """

    def __init__(
        self,
        scores: BaseScore | Sequence[BaseScore],
        *,
        combine: P.CombineMethod = "bonferroni",
        class_conditional: bool = False,
        randomize: bool = False,
        seed: int = 0,
    ) -> None:
        listed = fitted_scores(
            scores,
            unfit_error=ValueError,
            hint="fit it on training data before building a detector",
        )
        P.combination_factor(len(listed), combine)  # validates `combine`
        self.scores = listed
        self.combine: P.CombineMethod = combine
        self.class_conditional = bool(class_conditional)
        self.randomize = bool(randomize)
        self.seed = int(seed)

    # -- life cycle -------------------------------------------------------------------------
    @property
    def is_fit(self) -> bool:
        """Whether :meth:`fit` has run."""
        return "holdout_conformities_" in self.__dict__

    def _check_fit(self) -> None:
        if not self.is_fit:
            msg = "This ConformalDetector is not fitted yet: call `fit(holdout)` first"
            raise RuntimeError(msg)

    def _conformities(
        self, batches: Iterable[Tensor]
    ) -> tuple[Tensor, Tensor, int] | tuple[None, None, int]:
        """``(K, n)`` conformities at the predicted class, ``(n,)`` predicted classes."""
        confs: list[Tensor] = []
        classes: list[Tensor] = []
        n_classes = 0
        for inputs in batches:
            results = _infer(self.scores, inputs)
            out = results[0][0]
            n_classes = int(out.shape[1]) if out.ndim == 2 else 1
            classes.append(
                out.argmax(1) if out.ndim == 2 else torch.zeros_like(out, dtype=torch.int64)
            )
            confs.append(torch.stack([_at_predicted(o, c) for o, c in results]))
        if not confs:
            return None, None, 0
        return torch.cat(confs, dim=1), torch.cat(classes), n_classes

    def fit(self, holdout: Any, *, batch_size: int | None = None) -> ConformalDetector:
        """Store the conformities of in-distribution ``holdout`` inputs and return ``self``.

        Args:
            holdout: a tensor of inputs, or an iterable of input batches or of
                ``(inputs, labels)`` batches (e.g. a ``DataLoader``; labels are ignored).
                They must be exchangeable with future in-distribution inputs and unseen by
                the scores' own calibration.
            batch_size: split a tensor ``holdout`` in batches of this size.

        Raises:
            ValueError: fewer than :data:`MIN_HOLDOUT` inputs (per class in
                class-conditional mode), or NaN conformities (says how many).
        """
        batches, _ = as_batches(holdout, None)
        confs, classes, n_classes = self._conformities(
            piece for inputs, _ in batches for piece in _split(inputs, batch_size)
        )
        if confs is None or classes is None:
            msg = f"`holdout` must hold at least {MIN_HOLDOUT} inputs (got 0)"
            raise ValueError(msg)
        return self.fit_conformities(confs, classes, n_classes)

    def fit_conformities(
        self, conformities: Tensor, classes: Tensor | None = None, n_classes: int | None = None
    ) -> ConformalDetector:
        """:meth:`fit` from precomputed holdout conformities (see :meth:`scored`).

        Args:
            conformities: ``(K, n)`` (or ``(n,)`` for one score) conformities at the
                predicted class of the ``n`` holdout inputs, one row per score.
            classes: ``(n,)`` predicted classes (needed in class-conditional mode).
            n_classes: number of classes (default: ``classes.max() + 1``).
        """
        confs = conformities.reshape(len(self.scores), -1)
        if classes is None:
            if self.class_conditional:
                msg = "`classes` (predicted classes) is needed in class-conditional mode"
                raise ValueError(msg)
            classes = torch.zeros(confs.shape[1], dtype=torch.int64, device=confs.device)
        classes = classes.to(device=confs.device, dtype=torch.int64)
        if classes.shape != (confs.shape[1],):
            msg = f"`classes` must have shape ({confs.shape[1]},) (got {tuple(classes.shape)})"
            raise ValueError(msg)
        if n_classes is None:
            n_classes = int(classes.max()) + 1 if len(classes) else 1
        if confs.shape[1] < MIN_HOLDOUT:
            msg = f"`holdout` must hold at least {MIN_HOLDOUT} inputs (got {confs.shape[1]})"
            raise ValueError(msg)
        n_nan = int(torch.isnan(confs).any(dim=0).sum())
        if n_nan:
            per_score = ", ".join(
                f"{type(s).__name__}: {int(torch.isnan(c).sum())}"
                for s, c in zip(self.scores, confs)
            )
            msg = (
                f"`holdout` has {n_nan} inputs with NaN conformities out of {confs.shape[1]} "
                f"({per_score})"
            )
            raise ValueError(msg)
        if self.class_conditional:
            sizes = P.group_sizes(classes, n_classes)
            small = (sizes < MIN_HOLDOUT).nonzero().flatten().tolist()
            if small:
                counts = {c: int(sizes[c]) for c in small}
                msg = (
                    f"Class-conditional mode needs at least {MIN_HOLDOUT} holdout inputs "
                    f"predicted in each class; classes {counts} (class: count) have fewer"
                )
                raise ValueError(msg)
        self._set_state(confs, classes, n_classes)
        return self

    def _set_state(self, confs: Tensor, classes: Tensor, n_classes: int) -> None:
        self.holdout_conformities_ = confs
        self.holdout_classes_ = classes
        self.n_classes_ = n_classes
        groups = classes if self.class_conditional else None
        n_groups = n_classes if self.class_conditional else 1
        self._sorted = P.sorted_holdout(confs, groups, n_groups)
        self._generator: torch.Generator | None = None
        if self.randomize:
            self._generator = torch.Generator(device=confs.device).manual_seed(self.seed)

    @property
    def n_holdout(self) -> int:
        """Number of holdout inputs."""
        self._check_fit()
        return int(self.holdout_conformities_.shape[1])

    def _group_sizes(self) -> Tensor:
        _, _, starts = self._sorted
        return starts[1:] - starts[:-1]

    # -- decisions --------------------------------------------------------------------------
    def _check_alpha(self, alpha: float) -> float:
        alpha = P.check_alpha(alpha)
        sizes = self._group_sizes()
        k = len(self.scores)
        reachable = P.smallest_p_value(sizes, k, self.combine) <= alpha
        if not bool(reachable.all()):
            needed = P.min_holdout_size(alpha, k, self.combine)
            if self.class_conditional:
                bad = {c: int(sizes[c]) for c in (~reachable).nonzero().flatten().tolist()}
                msg = (
                    f"alpha={alpha} is below the smallest p-value of classes {bad} (class: "
                    f"holdout count): no input predicted in them could ever be flagged; "
                    f"each class needs at least {needed} holdout inputs for this alpha"
                )
            else:
                msg = (
                    f"alpha={alpha} is below the smallest p-value 1/(n+1) with n="
                    f"{int(sizes[0])} holdout inputs: no input could ever be flagged; "
                    f"this alpha needs at least n={needed} holdout inputs"
                )
            raise ValueError(msg)
        return alpha

    def scored(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(K, m)`` conformities at the predicted class and ``(m,)`` predicted classes of
        ``inputs`` (one forward; no fit needed), e.g. to reuse them across many holdouts."""
        confs, classes, _ = self._conformities([inputs])
        assert confs is not None and classes is not None  # one batch was given
        return confs, classes

    def p_values_from(self, conformities: Tensor, classes: Tensor | None = None) -> Tensor:
        """Combined p-values ``(m,)`` of precomputed ``(K, m)`` (or ``(m,)``) conformities.

        ``classes`` (predicted classes) is needed in class-conditional mode.
        """
        self._check_fit()
        confs = conformities.reshape(len(self.scores), -1)
        if self.class_conditional and classes is None:
            msg = "`classes` (predicted classes) is needed in class-conditional mode"
            raise ValueError(msg)
        groups = classes if self.class_conditional else None
        p = P.conformal_p_values(
            self._sorted,
            confs,
            test_groups=groups,
            randomize=self.randomize,
            generator=self._generator,
        )
        return P.combine_p_values(p, self.combine)

    def p_values(self, inputs: Tensor) -> Tensor:
        """Conformal p-values ``(m,)`` in ``(0, 1]`` of ``inputs`` (small = unusual).

        Raises:
            ValueError: NaN conformities (says how many).
        """
        confs, classes = self.scored(inputs)
        return self.p_values_from(confs, classes)

    def predict(self, inputs: Tensor, alpha: float = 0.05, *, fdr: bool = False) -> Tensor:
        """``(m,)`` bool: ``True`` = rejected as out-of-distribution.

        Args:
            inputs: a batch of inputs.
            alpha: with ``fdr=False``, each in-distribution input is flagged with
                probability at most ``alpha``; with ``fdr=True``, Benjamini–Hochberg over the
                batch keeps the expected fraction of in-distribution inputs among the flagged
                ones at most ``alpha`` (single score; see ``docs/decisions.md``).
            fdr: control the false discovery rate over the batch instead.

        Raises:
            ValueError: ``alpha`` outside (0, 1), or too small for the holdout size.
        """
        self._check_fit()
        alpha = self._check_alpha(alpha)
        p = self.p_values(inputs)
        return P.benjamini_hochberg(p, alpha) if fdr else p <= alpha

    def threshold(self, alpha: float = 0.05) -> Tensor:
        """Conformity cuts equivalent to ``predict(alpha)``: an input is flagged iff its
        conformity is below the cut (of its predicted class, in class-conditional mode).

        Returns:
            Shape ``(K,)`` (one cut per score; with several scores only for
            ``combine="bonferroni"``: flagged iff below any cut), or ``(K, C)`` in
            class-conditional mode. With ``randomize=True``, ``predict`` flags these inputs
            and, at most, some inputs tied with a cut.
        """
        self._check_fit()
        alpha = self._check_alpha(alpha)
        k = len(self.scores)
        if k > 1 and self.combine != "bonferroni":
            msg = (
                f"threshold() needs one score or combine='bonferroni' (got combine="
                f"{self.combine!r} with {k} scores): the harmonic combination is no cut"
            )
            raise ValueError(msg)
        sizes = self._group_sizes()
        ranks = P.cut_ranks(sizes, alpha, P.combination_factor(k, self.combine))
        _, _, starts = self._sorted
        confs = self.holdout_conformities_.to(torch.float64)
        if self.class_conditional:
            # holdout sorted by (class, conformity): per class, the ranks-th smallest
            order = confs.argsort(dim=1, stable=True)
            by_class = self.holdout_classes_[order].argsort(dim=1, stable=True)
            ordered = confs.gather(1, order.gather(1, by_class))
            cuts = ordered[:, (starts[:-1] + ranks - 1).clamp(min=0)]
            return cuts.where(ranks > 0, torch.full_like(cuts, -torch.inf))
        values, _, _ = self._sorted
        return values[:, int(ranks[0]) - 1]

    # -- files (see scio.decision.files) --------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write the fitted detector and its scores to ``path`` (safe format, see
        :mod:`scio.serialization`; load with :meth:`ConformalDetector.load`).

        With ``randomize=True``, the loaded detector restarts its tie-breaking generator
        from ``seed`` (its draws repeat those made right after ``fit``)."""
        self._check_fit()
        save_detector(self, path)

    @classmethod
    def load(
        cls,
        path: PathLike,
        net: nn.Module | Sequence[nn.Module],
        *,
        classes: Iterable[type[BaseScore]] = (),
        **recorder_kwargs: Any,
    ) -> ConformalDetector:
        """Load a detector saved with :meth:`save`, binding its scores to ``net``.

        Args:
            path: the detector file.
            net: the network (or one network per score).
            classes: user-defined score classes the file may name.
            **recorder_kwargs: passed to each score's new recorder.

        Raises:
            DetectorFileError: unsafe, unreadable, other format version or other algorithm.
            scio.serialization.ScoreFileError: a score that does not fit ``net``.
        """

        params, scores, state, nets = read_detector(
            cls.__name__, path, net, classes, recorder_kwargs
        )
        detector = cls(scores, **params)
        device = next((p.device for p in nets[0].parameters()), torch.device("cpu"))
        detector._set_state(
            state["holdout_conformities_"].to(device),
            state["holdout_classes_"].to(device),
            int(state["n_classes_"]),
        )
        return detector

    def __repr__(self) -> str:
        status = f"fit, n={self.n_holdout}" if self.is_fit else "unfit"
        scores = ", ".join(repr(score) for score in self.scores)
        return (
            f"ConformalDetector[{status}](scores=[{scores}], combine={self.combine!r}, "
            f"class_conditional={self.class_conditional}, randomize={self.randomize}, "
            f"seed={self.seed})"
        )


def _split(inputs: Tensor, batch_size: int | None) -> list[Tensor]:
    if batch_size is None or batch_size >= len(inputs):
        return [inputs]
    if batch_size <= 0:
        msg = f"`batch_size` must be a positive integer (got {batch_size})"
        raise ValueError(msg)
    return list(inputs.split(batch_size))
