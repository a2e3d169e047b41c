"""JTLA: joint statistical testing across layers of neighbour-label distributions."""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Literal, NotRequired, TypedDict

import torch
from torch import Tensor

from scio.scores.classification.base import BaseScoreClassif
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch, validate_labels
from scio.scores.core.validation import ParamError, ParamRange, param_ranges
from scio.scores.utils import (
    Index,
    ak_lpe,
    get_aggregator,
    knn_label_count,
    make_indexes,
    normalize_samples,
)
from scio.scores.utils.jtla_stats import layer_subsets, multinomial_tests, subset_pvalues
from scio.utils.enums import (
    AggrName,
    ClassAggr,
    ClassAggrLike,
    IndexMetric,
    IndexMetricLike,
    MultinomialTestMode,
    MultinomialTestModeLike,
)

__all__ = ["JTLA", "JTLATestMultinomial"]


class JTLATestMultinomial(TypedDict):
    """Multinomial test of JTLA: ``{"type": "multinomial", "mode": ..., "k": ...}``.

    Keys:
        type: ``"multinomial"``.
        mode: ``"mle"``, ``"map"`` or ``"dcm"`` (see
            :func:`scio.scores.utils.multinomial_test`).
        k: number of neighbours whose labels are counted (``0 < k <= n_calib``).
        prior: Dirichlet prior, a float or a tensor broadcast to ``(C, C)`` (row ``c`` is
            the prior of class ``c``'s test); default 1.
        special_prior: ``e`` gives the prior ``1 + e/C`` off the diagonal and
            ``2 - (C-1)·e/C`` on it (takes precedence over ``prior``).
    """

    type: Literal["multinomial"]
    mode: MultinomialTestModeLike
    k: int
    prior: NotRequired[Tensor | float]
    special_prior: NotRequired[float]


_Condition = Literal["true", "pred"]


def parse_layer_aggregation(spec: str, default_k: int) -> tuple[str, int | tuple[int, ...]]:
    """Parse ``layer_aggregation``.

    ``"lpe"`` / ``"lpe:K"`` → ``("lpe", K)`` (``K`` defaults to ``default_k``);
    ``"<AggrName>"`` / ``"<AggrName>:n1,n2,..."`` → ``(name, sorted unique tuple sizes)``
    (default sizes ``(1,)``).

    Raises:
        ValueError: unknown aggregation name (enum error) or invalid number.

    """
    name, sep, rest = str(spec).partition(":")
    name, rest = name.strip(), rest.strip()
    msg = (
        f"Unsupported layer aggregation {spec!r}: expected 'lpe', 'lpe:K' (K >= 1), "
        "'<aggregation>' or '<aggregation>:n1,n2,...' (tuple sizes >= 1)"
    )
    if name == "lpe":
        try:
            k = int(rest) if sep else int(default_k)
        except ValueError:
            raise ValueError(msg) from None
        if k < 1:
            raise ValueError(msg)
        return "lpe", k
    aggr = AggrName(name).value
    try:
        sizes = tuple(sorted({int(s) for s in rest.split(",")})) if sep else (1,)
    except ValueError:
        raise ValueError(msg) from None
    if sizes[0] < 1:
        raise ValueError(msg)
    return aggr, sizes


def _valid_test(test: Any) -> bool:
    """Whether ``test`` is a multinomial test with a positive integer ``k`` (``mode`` is
    checked by its enum at fit)."""
    k = test.get("k")
    return (
        test.get("type", "multinomial") == "multinomial"
        and isinstance(k, int)
        and not isinstance(k, bool)
        and k > 0
    )


class JTLA(StreamingCalibration, BaseScoreClassif):
    """Joint statistical Testing across DNN Layers for Anomalies (Raghuram et al., "A
    General Framework For Detecting Anomalous Inputs to DNN Classifiers", ICML 2021).

    Idea: at every recorded layer, the labels of an input's ``k`` nearest calibration
    neighbours follow a class-specific multinomial pattern; a statistical test measures how
    atypical the observed label counts are for each candidate class, tests are turned into
    p-values against calibration samples and combined across layers.

    Formula: at layer ``l`` (``act_norm``-normalised features, ``index_metric`` neighbours,
    inner product = cosine by default), ``N_l(x)`` counts the true labels of the ``k``
    nearest calibration samples. For class ``c``, the reference counts
    ``S_{l,c} = Σ_{i: y_i = c} N_l(x_i)`` (``x_i``'s neighbours excluding itself; ``y_i`` the
    true label, or the network's prediction for the ``pred``-conditional tests) define the
    statistic ``T_{l,c}(x)``: ``mle`` ``KL(N‖S)``, ``map`` ``KL(N‖S + prior - 1)``, ``dcm``
    the Dirichlet-multinomial surprise with ``α = S + prior`` (NaN/``+inf`` → ``+inf``;
    high = deviant). Calibration statistics use every calibration sample (itself included
    among its neighbours, like a query). Layer aggregation into ``q_c(x)`` (high =
    conformal):

    * ``"<aggr>[:t1,t2,...]"`` (default sizes ``1``): for every subset ``s`` of ``t`` layers
      (all combinations, or consecutive windows with ``layer_aggregation_consecutive``),
      ``p_s = #{i : T_{l,c}(x_i) >= T_{l,c}(x) ∀ l ∈ s} / n_calib``, then
      ``q_c = aggr(p)`` (``fisher`` = sum of logs, ...).
    * ``"lpe[:K]"``: the ``(L,)`` vectors of statistics are ``act_norm``-normalised, and
      ``q_c`` compares the averaged K-NN statistic ``ak_lpe`` of the query among class
      ``c``'s calibration vectors with those of the calibration vectors themselves:
      ``p = #{i: a_i < a(x)} / n_calib``, ``q = p`` (``ip``) or ``1 - p`` (``l2``).

    Class aggregation: ``nat`` → ``q_pred`` (``q_true`` without ``pred_conditional``);
    ``adv`` → ``q_pred_c / max_{c' ≠ c} q_true_{c'}`` with ``nan_to_num``.
    Differences from the paper (as in the reference): no bootstrap, no dimensionality
    reduction, extra ``dcm`` mode, arbitrary layer tuples, optional pred-conditional tests.
    Reference quirk kept: a class whose reference counts are all zero (absent class, or
    never predicted) with ``mle`` has ``+inf`` statistics everywhere, hence p-values 1.

    Args:
        test: the statistical test (:class:`JTLATestMultinomial`); replaced by a
            read-only mapping at fit.
        layer_aggregation: ``"fisher"``, ``"<aggr>:1,2"``, ``"lpe"``, ``"lpe:K"``.
        layer_aggregation_consecutive: only consecutive layer windows (does not unfit).
        class_aggregation: ``"nat"`` or ``"adv"`` (does not unfit).
        pred_conditional: also build tests conditioned on the predicted class.
        index_metric: ``"ip"`` (default) or ``"l2"``.
        act_norm: feature normalisation order (default 2).

    Cost: no extra forward pass. Calibration keeps the normalised features of every layer
    and the labels (the nearest-neighbour indexes), the ``(C, n_calib, L)`` calibration
    statistics (per conditioning), and ``2`` exact k-NN searches of the calibration set per
    layer. Inference: one k-NN search per layer, ``(C, n, C)`` test statistics (by chunks),
    p-values by ``searchsorted`` for single layers and chunked ``(C, n, n_calib, L)``
    comparisons for layer tuples; ``lpe`` runs one small search per class.
    """

    act_norm: float | None = 2
    test: JTLATestMultinomial
    layer_aggregation: str = "fisher"
    layer_aggregation_consecutive: bool = False
    class_aggregation: ClassAggrLike = "nat"
    pred_conditional: bool = True
    index_metric: IndexMetricLike = "ip"

    _fitted_attrs = (
        "indexes",
        "labels",
        "n_classes",
        "test_params",
        "calib_tests",
        "calib_sorted",
        "lpe_indexes",
        "lpe_references",
    )

    def _on_param_will_be_set(self, attr: str, future_val: Any) -> None:
        if attr in ("class_aggregation", "layer_aggregation_consecutive"):
            return
        super()._on_param_will_be_set(attr, future_val)

    _param_ranges = param_ranges(
        test=ParamRange(
            _valid_test,
            "a mapping with 'type': 'multinomial', a 'mode' and a positive integer 'k'",
        )
    )

    def _check_params(self, n_calib: int) -> None:
        super()._check_params(n_calib)
        test = self.test
        if test["k"] > n_calib:
            msg = (
                f"Parameter `test` of JTLA: its 'k' must satisfy 0 < k <= n_calib = {n_calib} "
                f"calibration samples (got k={test['k']})"
            )
            raise ParamError(msg)
        MultinomialTestMode(test["mode"])
        if not isinstance(test, MappingProxyType):
            self.test = MappingProxyType(dict(test))  # type: ignore[assignment]
        parse_layer_aggregation(self.layer_aggregation, test["k"])
        ClassAggr(self.class_aggregation)
        IndexMetric(self.index_metric)

    # -- helpers --------------------------------------------------------------------------------
    def _prior(self, n_classes: int, like: Tensor) -> Tensor:
        """``(C, C)`` prior in ``like``'s dtype, rounded as the reference does."""
        test = self.test
        if "special_prior" in test:
            e = float(test["special_prior"])
            prior = torch.full((n_classes, n_classes), 1 + e / n_classes)  # default dtype
            prior.fill_diagonal_(2 - (n_classes - 1) * e / n_classes)
            return prior.to(like)
        value = torch.as_tensor(test.get("prior", 1)).to(like)
        return value.broadcast_to((n_classes, n_classes)).clone()

    def _conditions(self) -> tuple[_Condition, ...]:
        return ("true", "pred") if self.pred_conditional else ("true",)

    def _tests(self, counts: list[Tensor], condition: _Condition) -> Tensor:
        """``(C, n, L)`` statistics of the observed counts of every layer."""
        mode = MultinomialTestMode(self.test["mode"])
        params = self.test_params[condition]
        return torch.stack(
            [multinomial_tests(c, params[i], mode) for i, c in enumerate(counts)], dim=-1
        )

    def _lpe_normalize(self, tests: Tensor) -> Tensor:
        return normalize_samples(tests, ord=self.act_norm, same_inf=True, sample_start_dim=2)

    # -- calibration ----------------------------------------------------------------------------
    def _calib_update(self, batch: CalibBatch) -> None:
        out = batch.out
        self._n_classes = int(out.shape[1])
        labels = validate_labels(batch.labels, len(batch), out.shape[1])
        self._state.append("labels_true", labels.to(out.device))
        if self.pred_conditional:
            self._state.append("labels_pred", out.argmax(dim=1))
        for i, features in enumerate(self.normalize(batch.activations)):
            self._state.append(f"features{i}", features.reshape(len(features), -1))

    def _calib_end(self) -> None:
        n_classes = self._n_classes
        labels = self._state.cat("labels_true")
        features: list[Tensor] = []
        while f"features{len(features)}" in self._state:
            features.append(self._state.cat(f"features{len(features)}"))
        if not features:
            msg = "JTLA score needs at least one recorded layer"
            raise ValueError(msg)
        n_layers = len(features)
        name, arg = parse_layer_aggregation(self.layer_aggregation, self.test["k"])
        if name != "lpe":
            assert isinstance(arg, tuple)
            if arg[-1] > n_layers:
                msg = (
                    f"Layer tuples of size {arg[-1]} requested by layer_aggregation="
                    f"{self.layer_aggregation!r}, but only {n_layers} layers are recorded"
                )
                raise ValueError(msg)
        k = int(self.test["k"])
        mode = MultinomialTestMode(self.test["mode"])
        device = features[0].device
        prior = self._prior(n_classes, features[0])
        indexes: tuple[Index, ...] = make_indexes(features, metric=self.index_metric)
        self_counts, counts = [], []
        for index, feats in zip(indexes, features):
            own = knn_label_count(index, labels, n_classes, k, feats, self_query=True)
            self_counts.append(own)
            counts.append(knn_label_count(index, labels, n_classes, k, feats))
        self.indexes: tuple[Index, ...] = indexes
        self.labels: Tensor = labels
        self.n_classes: int = n_classes
        self.test_params: dict[str, Tensor] = {}
        self.calib_tests: dict[str, Tensor] = {}
        self.calib_sorted: dict[str, Tensor] = {}
        self.lpe_indexes: dict[str, tuple[Index, ...]] = {}
        self.lpe_references: dict[str, Tensor] = {}
        for condition in self._conditions():
            groups = labels if condition == "true" else self._state.cat("labels_pred")
            groups = groups.to(device)
            params = []
            for own in self_counts:
                # int64 sums of the int64 counts, then the prior in the activations' dtype
                ref = torch.zeros((n_classes, n_classes), dtype=own.dtype, device=device)
                ref.index_add_(0, groups, own.to(device))
                if mode == MultinomialTestMode.MAP:
                    ref = ref + prior - 1
                elif mode == MultinomialTestMode.DCM:
                    ref = ref + prior
                params.append(ref)
            self.test_params[condition] = torch.stack(params)
            tests = self._tests(counts, condition)  # (C, n, L)
            if name == "lpe":
                assert isinstance(arg, int)
                self._fit_lpe(condition, tests, arg)
            else:
                assert isinstance(arg, tuple)
                if arg[0] == 1:
                    self.calib_sorted[condition] = (
                        tests.transpose(1, 2).sort(dim=-1).values.contiguous()
                    )
                if arg[-1] > 1:
                    self.calib_tests[condition] = tests.transpose(1, 2).contiguous()

    def _fit_lpe(self, condition: _Condition, tests: Tensor, k: int) -> None:
        normalized = self._lpe_normalize(tests)
        indexes: tuple[Index, ...] = make_indexes(tuple(normalized), metric=self.index_metric)
        references = torch.stack(
            [
                ak_lpe(index, k, class_tests, self_query=True)
                for index, class_tests in zip(indexes, normalized)
            ]
        )
        self.lpe_indexes[condition] = indexes
        self.lpe_references[condition] = references.nan_to_num(nan=math.inf).sort(dim=1).values

    # -- inference ------------------------------------------------------------------------------
    def _layer_aggregate(self, counts: list[Tensor], condition: _Condition) -> Tensor:
        """q-values ``(n, C)`` (high = conformal) for one conditioning."""
        tests = self._tests(counts, condition)  # (C, n, L)
        name, arg = parse_layer_aggregation(self.layer_aggregation, self.test["k"])
        if name == "lpe":
            assert isinstance(arg, int)
            normalized = self._lpe_normalize(tests)
            references = self.lpe_references[condition]
            values = torch.stack(
                [
                    ak_lpe(index, arg, class_tests).nan_to_num(nan=math.inf)
                    for index, class_tests in zip(self.lpe_indexes[condition], normalized)
                ]
            ).to(device=references.device, dtype=references.dtype)
            below = torch.searchsorted(references, values.contiguous())
            p = below.to(torch.float64) / references.shape[1]
            q = p if IndexMetric(self.index_metric) == IndexMetric.IP else 1 - p
            return q.T
        assert isinstance(arg, tuple)
        n_layers = tests.shape[-1]
        subsets = [
            s
            for size in arg
            for s in layer_subsets(n_layers, size, consecutive=self.layer_aggregation_consecutive)
        ]
        p = subset_pvalues(
            tests, self.calib_tests.get(condition), self.calib_sorted.get(condition), subsets
        )
        return get_aggregator(AggrName(name))(p, dim=-1).T

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        kind = ClassAggr(self.class_aggregation)
        if kind not in (ClassAggr.NAT, ClassAggr.ADV):
            msg = f"Unsupported class aggregation: {kind!r}"
            raise ValueError(msg)
        out = self.rnet(inputs)
        features = self.activations()
        if len(features) != len(self.indexes):
            msg = (
                f"JTLA was fit on {len(self.indexes)} recorded layers, but the recorder now "
                f"records {len(features)}"
            )
            raise RuntimeError(msg)
        k = int(self.test["k"])
        counts = [
            knn_label_count(index, self.labels, self.n_classes, k, f.reshape(f.shape[0], -1))
            for index, f in zip(self.indexes, features)
        ]
        pred: _Condition = "pred" if self.pred_conditional else "true"
        q_pred = self._layer_aggregate(counts, pred)
        if kind == ClassAggr.NAT:
            return out, q_pred.to(out.dtype)
        q_true = q_pred if pred == "true" else self._layer_aggregate(counts, "true")
        top = q_true.topk(2, dim=1)
        others_max = top.values[:, :1].expand_as(q_true).clone()
        others_max.scatter_(1, top.indices[:, :1], top.values[:, 1:2])
        conformity = (q_pred / others_max).to(out.dtype).nan_to_num()
        return out, conformity
