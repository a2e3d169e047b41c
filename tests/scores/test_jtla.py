"""JTLA against a naive loop implementation, plus parameters, errors and batches."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification import jtla as jtla_module
from scio.scores.classification.jtla import JTLA, parse_layer_aggregation
from scio.scores.utils import jtla_stats, multinomial_test
from scio.utils.enums import EnumWithExplicitSupport

LAYERS = ((1, 2), (1, 4), (1, 5))
N_CLASSES = 3
INF = math.inf


# -- naive reference ---------------------------------------------------------------------------
def _unit(v: Tensor) -> Tensor:
    return v / v.norm()


def _neighbours(
    population: list[Tensor], query: Tensor, k: int, metric: str, exclude: int | None
) -> list[float]:
    """Values (similarity or squared distance) of the ``k`` nearest, best first, ties by id."""
    candidates = []
    for j, ref in enumerate(population):
        if j == exclude:
            continue
        if metric == "ip":
            candidates.append((-float(query @ ref), j))
        else:
            candidates.append((float(((query - ref) ** 2).sum()), j))
    candidates.sort()
    values = [c for c, _ in candidates[:k]]
    return [-v for v in values] if metric == "ip" else values


def _label_counts(
    population: list[Tensor], labels: list[int], query: Tensor, k: int, metric: str, exclude: Any
) -> list[int]:
    candidates = []
    for j, ref in enumerate(population):
        if j == exclude:
            continue
        value = -float(query @ ref) if metric == "ip" else float(((query - ref) ** 2).sum())
        candidates.append((value, j))
    candidates.sort()
    counts = [0] * N_CLASSES
    for _, j in candidates[:k]:
        counts[labels[j]] += 1
    return counts


def _prior(test: dict[str, Any]) -> Tensor:
    """The reference's prior: the special prior is built in the default dtype (float32)."""
    prior = torch.ones(N_CLASSES, N_CLASSES, dtype=torch.float64)
    if "special_prior" in test:
        e = test["special_prior"]
        for a in range(N_CLASSES):
            for b in range(N_CLASSES):
                value = 2 - (N_CLASSES - 1) * e / N_CLASSES if a == b else 1 + e / N_CLASSES
                prior[a, b] = float(torch.tensor(value, dtype=torch.float32))
    elif "prior" in test:
        prior = prior * torch.as_tensor(test["prior"], dtype=torch.float64)
    return prior


def _aggregate(name: str, ps: list[float]) -> float:
    if name == "fisher":
        return sum(math.log(p) if p > 0 else -INF for p in ps)
    if name == "mean":
        return sum(ps) / len(ps)
    if name == "max":
        return max(ps)
    if name == "min":
        return min(ps)
    raise NotImplementedError(name)


def _lpe_normalize(values: list[float]) -> list[float]:
    """L2 normalisation where ``+inf`` entries share the unit mass (``same_inf``)."""
    n_inf = sum(math.isinf(v) for v in values)
    if n_inf:
        return [1 / math.sqrt(n_inf) if math.isinf(v) else 0.0 for v in values]
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values] if norm > 0 else values


def _ak(population: list[Tensor], query: Tensor, k: int, metric: str, exclude: Any) -> float:
    big_k = 3 * k // 2
    if len(population) - (exclude is not None) < big_k:
        return INF
    values = _neighbours(population, query, big_k, metric, exclude)
    return sum(values[big_k - k :]) / k


def _naive_jtla(
    calib_acts: list[Tensor],
    labels: list[int],
    preds: list[int],
    test_acts: list[Tensor],
    *,
    test: dict[str, Any],
    layer_aggregation: str,
    consecutive: bool,
    class_aggregation: str,
    pred_conditional: bool,
    metric: str,
) -> tuple[Tensor, Tensor]:
    """Returns lower and upper bounds of the conformity (they differ only for ``lpe`` ties)."""
    k = test["k"]
    n, n_test, n_layers = len(labels), len(test_acts[0]), len(calib_acts)
    calib = [[_unit(a.flatten()) for a in layer] for layer in calib_acts]
    query = [[_unit(a.flatten()) for a in layer] for layer in test_acts]
    self_counts = [
        [_label_counts(calib[l], labels, calib[l][i], k, metric, i) for i in range(n)]
        for l in range(n_layers)
    ]
    calib_counts = [
        [_label_counts(calib[l], labels, calib[l][i], k, metric, None) for i in range(n)]
        for l in range(n_layers)
    ]
    test_counts = [
        [_label_counts(calib[l], labels, query[l][i], k, metric, None) for i in range(n_test)]
        for l in range(n_layers)
    ]
    prior = _prior(test)

    def statistics(groups: list[int]) -> Callable[[list[list[list[int]]], int], list[list[float]]]:
        tests = {}
        for l in range(n_layers):
            for c in range(N_CLASSES):
                members = [self_counts[l][i] for i in range(n) if groups[i] == c]
                # integer counts, as the reference's knn_label_count returns them
                ref = torch.tensor(members, dtype=torch.int64).reshape(-1, N_CLASSES)
                tests[l, c] = multinomial_test(ref, prior[c], test["mode"])

        def run(counts: list[list[list[int]]], i: int) -> list[list[float]]:
            out = []
            for c in range(N_CLASSES):
                row = []
                for l in range(n_layers):
                    obs = torch.tensor(counts[l][i], dtype=torch.int64)
                    value = float(tests[l, c](obs))
                    row.append(INF if math.isnan(value) else value)
                out.append(row)
            return out  # [class][layer]

        return run

    name, _, rest = layer_aggregation.partition(":")

    def q_values(groups: list[int]) -> tuple[list[list[float]], list[list[float]]]:
        run = statistics(groups)
        calib_t = [run(calib_counts, i) for i in range(n)]
        test_t = [run(test_counts, i) for i in range(n_test)]
        low = [[0.0] * N_CLASSES for _ in range(n_test)]
        high = [[0.0] * N_CLASSES for _ in range(n_test)]
        for c in range(N_CLASSES):
            if name == "lpe":
                big = int(rest) if rest else k
                vecs = [
                    torch.tensor(_lpe_normalize(calib_t[i][c]), dtype=torch.float64)
                    for i in range(n)
                ]
                refs = [_ak(vecs, vecs[i], big, metric, i) for i in range(n)]
                for t in range(n_test):
                    value = _ak(
                        vecs,
                        torch.tensor(_lpe_normalize(test_t[t][c]), dtype=torch.float64),
                        big,
                        metric,
                        None,
                    )
                    bounds = []
                    for shift in (-1e-9, 1e-9):
                        p = sum(r < value + shift for r in refs) / n
                        bounds.append(p if metric == "ip" else 1 - p)
                    low[t][c], high[t][c] = min(bounds), max(bounds)
                continue
            sizes = [int(s) for s in rest.split(",")] if rest else [1]
            subsets = []
            for size in sorted(set(sizes)):
                if consecutive:
                    subsets += [tuple(range(i, i + size)) for i in range(n_layers - size + 1)]
                else:
                    subsets += list(itertools.combinations(range(n_layers), size))
            for t in range(n_test):
                ps = []
                for s in subsets:
                    hits = sum(
                        all(calib_t[i][c][l] >= test_t[t][c][l] for l in s) for i in range(n)
                    )
                    ps.append(hits / n)
                low[t][c] = high[t][c] = _aggregate(name, ps)
        return low, high

    q_true = q_values(labels)
    q_pred = q_values(preds) if pred_conditional else q_true
    if class_aggregation == "nat":
        f64 = torch.float64
        return torch.tensor(q_pred[0], dtype=f64), torch.tensor(q_pred[1], dtype=f64)
    assert q_true[0] == q_true[1]
    result = []
    for t in range(n_test):
        row = []
        for c in range(N_CLASSES):
            others = max(q_true[0][t][o] for o in range(N_CLASSES) if o != c)
            value = torch.tensor(q_pred[0][t][c], dtype=torch.float64) / others  # inf/nan rules
            row.append(float(value))
        result.append(row)
    out = torch.tensor(result, dtype=torch.float64)
    return out, out


def _setup(
    dtype: torch.dtype = torch.float64, n: int = 30, seed: int = 0
) -> tuple[Recorder, Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    net = make_net(dtype=dtype, seed=2)
    calib = torch.randn(n, 1, 4, 4, generator=generator).to(dtype)
    labels = torch.randint(0, 2, (n,), generator=generator)  # class 2 absent
    test = (1.5 * torch.randn(7, 1, 4, 4, generator=generator)).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*LAYERS)
    return rnet, calib, labels, test


CASES = [
    # (mode, layer_aggregation, consecutive, class_aggregation, pred_conditional, metric, extra)
    ("mle", "fisher", False, "nat", True, "ip", {}),
    ("map", "fisher:1,2", False, "nat", True, "ip", {"prior": 2.0}),
    ("dcm", "fisher:1,2,3", True, "adv", True, "ip", {"special_prior": 0.5}),
    ("dcm", "mean:2", False, "nat", False, "l2", {}),
    ("mle", "max:1,3", False, "adv", False, "ip", {}),
    ("map", "min:2", True, "nat", True, "l2", {"prior": torch.tensor([1.0, 2.0, 3.0])}),
    ("dcm", "lpe", False, "nat", True, "ip", {}),
    ("mle", "lpe:2", False, "nat", False, "l2", {}),
    ("dcm", "lpe:3", False, "nat", False, "ip", {"special_prior": 1.0}),
]


@pytest.mark.parametrize(
    ("mode", "layer_aggregation", "consecutive", "class_aggregation", "pred", "metric", "extra"),
    CASES,
)
def test_jtla_matches_naive(
    mode: str,
    layer_aggregation: str,
    consecutive: bool,
    class_aggregation: str,
    pred: bool,
    metric: str,
    extra: dict[str, Any],
) -> None:
    rnet, calib, labels, test = _setup()
    test_dict = {"type": "multinomial", "mode": mode, "k": 4, **extra}
    score = JTLA(
        test=test_dict,
        layer_aggregation=layer_aggregation,
        layer_aggregation_consecutive=consecutive,
        class_aggregation=class_aggregation,
        pred_conditional=pred,
        index_metric=metric,
    ).fit(rnet, calib, labels)
    out, conformity = score(test)
    assert conformity.shape == (7, 3)
    assert conformity.dtype == torch.float64
    assert not conformity.isnan().any()
    with torch.no_grad():
        torch.testing.assert_close(out, rnet.net(test))
        calib_out = rnet(calib)
        calib_acts = [a.double() for a in rnet.activations.values()]
        rnet(test)
        test_acts = [a.double() for a in rnet.activations.values()]
    low, high = _naive_jtla(
        calib_acts,
        labels.tolist(),
        calib_out.argmax(1).tolist(),
        test_acts,
        test=test_dict,
        layer_aggregation=layer_aggregation,
        consecutive=consecutive,
        class_aggregation=class_aggregation,
        pred_conditional=pred,
        metric=metric,
    )
    if class_aggregation == "adv":
        low = low.nan_to_num()
        high = high.nan_to_num()
    tol = 1e-9
    assert torch.all((conformity >= low - tol) | (conformity == low)), (conformity, low)
    assert torch.all((conformity <= high + tol) | (conformity == high)), (conformity, high)
    if not layer_aggregation.startswith("lpe"):
        torch.testing.assert_close(conformity, low)


@pytest.mark.parametrize("dtype", DTYPES)
def test_jtla_dtypes(dtype: torch.dtype) -> None:
    rnet, calib, labels, test = _setup(dtype)
    test_dict = {"type": "multinomial", "mode": "dcm", "k": 4}
    for aggregation in ("fisher:1,2", "lpe"):
        score = JTLA(test=test_dict, layer_aggregation=aggregation, class_aggregation="adv")
        out, conformity = score.fit(rnet, calib, labels)(test)
        assert conformity.dtype == out.dtype == dtype
        assert conformity.shape == (7, 3)
        assert conformity.isfinite().all()
    # float64 reference: same neighbours and statistics up to rounding
    score = JTLA(test=test_dict).fit(rnet, calib, labels)
    reference_rnet, *_ = _setup(torch.float64)
    reference = JTLA(test=test_dict).fit(reference_rnet, calib.double(), labels)
    expected = reference(test.double())[1]
    if dtype != torch.float16:  # float16 features can change nearest neighbours
        torch.testing.assert_close(score(test)[1].double(), expected, atol=1e-2, rtol=1e-2)


def test_jtla_batches_equal_tensor() -> None:
    rnet, calib, labels, test = _setup(n=40)
    for aggregation in ("fisher:1,2", "lpe"):
        params = {
            "test": {"type": "multinomial", "mode": "map", "k": 5},
            "layer_aggregation": aggregation,
            "class_aggregation": "adv",
        }
        full = JTLA(**params).fit(rnet, calib, labels)
        loader = DataLoader(TensorDataset(calib, labels), batch_size=7)
        batched = JTLA(**params).fit(rnet, loader)
        assert torch.equal(full.labels, batched.labels)
        for name in ("calib_tests", "calib_sorted", "lpe_references"):
            for key, value in getattr(full, name).items():
                torch.testing.assert_close(getattr(batched, name)[key], value)
        torch.testing.assert_close(batched(test)[1], full(test)[1])


def test_jtla_params_without_unfit() -> None:
    rnet, calib, labels, test = _setup()
    score = JTLA(test={"type": "multinomial", "mode": "dcm", "k": 3}, layer_aggregation="mean:1,2")
    score.fit(rnet, calib, labels)
    nat = score(test)[1]
    score.class_aggregation = "adv"
    assert score.is_fit
    adv = score(test)[1]
    assert not torch.equal(nat, adv)
    score.layer_aggregation_consecutive = True
    assert score.is_fit
    score.class_aggregation = "nat"
    assert not torch.equal(score(test)[1], nat)  # (0, 2) is not a consecutive pair
    score.pred_conditional = False
    assert not score.is_fit
    score.fit(rnet, calib, labels)
    score.layer_aggregation = "fisher"
    assert not score.is_fit


def test_jtla_test_param() -> None:
    rnet, calib, labels, _ = _setup(n=10)
    with pytest.raises(RuntimeError, match=r"Missing parameters for JTLA score: \('test',\)"):
        JTLA().fit(rnet, calib, labels)
    for k in (0, 11):
        with pytest.raises(AssertionError):
            JTLA(test={"type": "multinomial", "mode": "mle", "k": k}).fit(rnet, calib, labels)
    with pytest.raises(AssertionError):
        JTLA(test={"type": "binomial", "mode": "mle", "k": 2}).fit(rnet, calib, labels)
    with pytest.raises(ValueError, match="is not a valid MultinomialTestMode"):
        JTLA(test={"type": "multinomial", "mode": "x", "k": 2}).fit(rnet, calib, labels)
    test = {"type": "multinomial", "mode": "mle", "k": 10}
    score = JTLA(test=test).fit(rnet, calib, labels)  # k == n_calib: degenerate but fine
    assert not score(calib)[1].isnan().any()
    assert isinstance(score.test, MappingProxyType)
    assert score.test == test
    with pytest.raises(TypeError):
        score.test["k"] = 3  # type: ignore[index]
    test["k"] = 3  # the caller's dict is not shared
    assert score.test["k"] == 10
    assert score.is_fit
    score.fit(rnet, calib, labels)  # refitting keeps the same read-only mapping
    assert score.is_fit
    assert repr(JTLA()) == (
        "JTLA[unfit](act_norm=2, mode='raw', test=?, layer_aggregation='fisher', "
        "layer_aggregation_consecutive=False, class_aggregation='nat', pred_conditional=True, "
        "index_metric='ip')"
    )


def test_jtla_layer_aggregation_parsing() -> None:
    assert parse_layer_aggregation("fisher", 4) == ("fisher", (1,))
    assert parse_layer_aggregation("mean:3,1,3", 4) == ("mean", (1, 3))
    assert parse_layer_aggregation("lpe", 4) == ("lpe", 4)
    assert parse_layer_aggregation("lpe: 7", 4) == ("lpe", 7)
    with pytest.raises(ValueError, match="is not a valid AggrName"):
        parse_layer_aggregation("foo", 4)
    for bad in ("fisher:0", "fisher:a", "lpe:x", "lpe:0", "fisher:"):
        with pytest.raises(ValueError, match="Unsupported layer aggregation"):
            parse_layer_aggregation(bad, 4)
    rnet, calib, labels, _ = _setup(n=10)
    test = {"type": "multinomial", "mode": "mle", "k": 2}
    with pytest.raises(ValueError, match="is not a valid AggrName"):
        JTLA(test=test, layer_aggregation="foo").fit(rnet, calib, labels)
    with pytest.raises(ValueError, match="only 3 layers are recorded"):
        JTLA(test=test, layer_aggregation="fisher:4").fit(rnet, calib, labels)


class _ClassAggrPlus(EnumWithExplicitSupport):
    ADV = "adv"
    NAT = "nat"
    NEW = "unexpected"


def test_jtla_unsupported_class_aggregation(monkeypatch: pytest.MonkeyPatch) -> None:
    rnet, calib, labels, test = _setup(n=10)
    score = JTLA(test={"type": "multinomial", "mode": "mle", "k": 2}).fit(rnet, calib, labels)
    with pytest.raises(ValueError, match="is not a valid ClassAggr"):  # checked when set
        score.class_aggregation = "wrong"
    monkeypatch.setattr(jtla_module, "ClassAggr", _ClassAggrPlus)
    score.__dict__["class_aggregation"] = "unexpected"  # bypass the check on assignment
    msg = "Unsupported class aggregation: <_ClassAggrPlus.NEW: 'unexpected'>"
    with pytest.raises(ValueError, match=re.escape(msg)):
        score(test)


def test_jtla_labels_and_inputs() -> None:
    rnet, calib, labels, test = _setup(n=12)
    score = JTLA(test={"type": "multinomial", "mode": "mle", "k": 2})
    with pytest.raises(ValueError, match="shape"):
        score.fit(rnet, calib, labels[:-1])
    with pytest.raises(ValueError, match="integer"):
        score.fit(rnet, calib, labels.double())
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        score.fit(rnet, calib, labels + 2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        score.fit(rnet, calib, labels - 1)
    assert not score.is_fit
    calib_copy, test_copy = calib.clone(), test.clone()
    score.fit(rnet, calib, labels)
    score(test)
    assert torch.equal(calib, calib_copy)
    assert torch.equal(test, test_copy)
    assert not calib.requires_grad
    assert not test.requires_grad


def test_jtla_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small memory bounds give the same results."""
    rnet, calib, labels, test = _setup()
    params = {
        "test": {"type": "multinomial", "mode": "dcm", "k": 4},
        "layer_aggregation": "fisher:1,2,3",
        "class_aggregation": "adv",
    }
    expected = JTLA(**params).fit(rnet, calib, labels)(test)[1]
    monkeypatch.setattr(jtla_stats, "_MAX_TEST_ELEMENTS", 20)
    monkeypatch.setattr(jtla_stats, "_MAX_COMPARE_ELEMENTS", 500)
    torch.testing.assert_close(JTLA(**params).fit(rnet, calib, labels)(test)[1], expected)
