"""Distributed calibration (2 gloo ranks on CPU) equals a single-process fit on the union."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from scio import scores
from scio.recorder import Recorder
from scio.scores import BaseScore, fit_jointly
from scio.scores.core.distributed import DistributedMismatchError
from scio.scores.utils import Index
from tests.catalogue import BY_NAME, CATALOGUE, FEAT, MAPS, Entry
from tests.conftest import make_net
from tests.distributed._launch import run_ranks

#: Algorithms whose merge only concatenates tensors in rank order: bitwise equality.
BITWISE = frozenset(
    {
        "Softmax", "BaselineClassif", "Logit", "Energy", "JointEnergy", "ODIN", "ReAct",
        "IsoMax", "GradNorm", "GradNorm-conv", "KNN", "LID", "Trust", "DkNN",
        "FeatureSqueezing", "Gram", "JTLA", "KNN-bank", "DkNN-bank", "Entropy", "GEN",
        "ASH", "SCALE", "OpenMax", "NNGuide",
    }
)  # fmt: skip
#: Scale extensions: the subsample is drawn on the merged bank, so it is shard-independent.
EXTRA = (
    Entry(
        "KNN-bank", lambda: scores.KNN(k=3, bank_fraction=0.5, bank_dtype="float16"), (MAPS, FEAT)
    ),
    Entry("DkNN-bank", lambda: scores.DkNN(k=2, bank_fraction=0.6, per_class=True), (FEAT,), True),
)
#: Hyper-parameters making calibration deterministic (Odds draws calibration noise).
DETERMINISTIC = {"Odds": {"epsilon": 0.0}}
#: Fitted attributes that are per-rank by design: Odds' noise generator state after the
#: rank's own draws (it seeds later inference noise).
PER_RANK = {"Odds": {"rng_state", "rng_device"}}

N, BATCH = 23, 7
#: Shards per scenario: sample ranges of rank 0 and rank 1 (uneven; an empty rank).
SCENARIOS = {"uneven": ((0, 15), (15, N)), "empty_rank": ((0, N), (N, N))}


def _data() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, 1, 4, 4, generator=generator)
    y = torch.randint(0, 3, (N,), generator=generator)
    queries = torch.randn(9, 1, 4, 4, generator=generator)
    return x, y, queries


def _batches(x: Tensor, y: Tensor, start: int, stop: int) -> list[tuple[Tensor, Tensor]]:
    return [
        (x[i : min(i + BATCH, stop)], y[i : min(i + BATCH, stop)])
        for i in range(start, stop, BATCH)
    ]


def _rec(net: torch.nn.Module, layers: Any) -> Recorder:
    rnet = Recorder(net, input_size=(1, 1, 4, 4))
    rnet.record(*layers)
    return rnet


def _tensors(value: Any) -> list[Tensor]:
    """Every tensor of a fitted attribute (indexes by their samples)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Index):
        return [value.samples]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, str):
        return [torch.tensor(list(value.encode()))]
    return [torch.tensor(float("nan") if value is None else float(value))]


def _state(score: BaseScore, skip: set[str]) -> list[Tensor]:
    names = [name for name in score._fitted_attrs if name not in skip]
    return [t for name in names for t in _tensors(getattr(score, name))]


def _compare(name: str, a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for ta, tb in zip(a, b, strict=True):
        if name in BITWISE:
            torch.testing.assert_close(ta, tb, rtol=0, atol=0, equal_nan=True)
        else:
            torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5, equal_nan=True)


def _catalogue_worker(rank: int) -> dict[str, str]:
    warnings.simplefilter("ignore")  # tiny data: singular covariances
    x, y, queries = _data()
    results: dict[str, str] = {}
    for scenario, shards in SCENARIOS.items():
        union = [b for start, stop in shards for b in _batches(x, y, start, stop)]
        mine = _batches(x, y, *shards[rank])
        for entry in (*CATALOGUE, *EXTRA):
            net = make_net()
            params = DETERMINISTIC.get(entry.name, {})
            try:
                single = entry.make(**params)
                single.fit(_rec(net, entry.layers), union)
                shared = entry.make(**params)
                rnet = _rec(net, entry.layers)
                shared.fit(rnet, mine, distributed=True)
                assert shared.is_fit and shared._fit_n_samples == N
                skip = PER_RANK.get(entry.name, set())
                _compare(entry.name, _state(shared, skip), _state(single, skip))
                _compare(entry.name, list(shared(queries)), list(single(queries)))
                results[f"{scenario}/{entry.name}"] = "ok"
            except Exception as exc:  # collected: the parent reports every failure
                results[f"{scenario}/{entry.name}"] = f"{type(exc).__name__}: {exc}"
    return results


def test_every_algorithm_matches_single_process_fit(tmp_path: Path) -> None:
    results = run_ranks(_catalogue_worker, tmp_path)
    for rank, (status, value) in enumerate(results):
        assert status == "ok", f"rank {rank}: {value}"
        failures = {key: msg for key, msg in value.items() if msg != "ok"}
        assert not failures, f"rank {rank}: {failures}"
        assert len(value) == len(SCENARIOS) * (len(CATALOGUE) + len(EXTRA))


def _joint_worker(rank: int) -> list[Tensor]:
    x, y, queries = _data()
    names = ("KNN", "DeepMahalanobis", "ReAct", "Trust")
    entries = [BY_NAME[name] for name in names]
    start, stop = SCENARIOS["empty_rank"][rank]
    scores = [entry.make() for entry in entries]
    pairs = [(score, entry.layers) for score, entry in zip(scores, entries, strict=True)]
    fit_jointly(pairs, make_net(), _batches(x, y, start, stop), distributed=True)
    return [score(queries)[1] for score in scores]


def test_fit_jointly_distributed_with_an_empty_rank(tmp_path: Path) -> None:
    results = run_ranks(_joint_worker, tmp_path)
    assert [status for status, _ in results] == ["ok", "ok"], results
    x, y, queries = _data()
    names = ("KNN", "DeepMahalanobis", "ReAct", "Trust")
    for i, name in enumerate(names):
        entry = BY_NAME[name]
        single = entry.make().fit(_rec(make_net(), entry.layers), x, y)
        expected = single(queries)[1]
        for _, conformities in results:
            torch.testing.assert_close(conformities[i], expected, rtol=1e-4, atol=1e-5)


def _mismatch_worker(rank: int) -> list[str]:
    x, y, _ = _data()
    messages = []
    shard = _batches(x, y, *SCENARIOS["uneven"][rank])
    cases = (
        (BY_NAME["KNN"].make(k=2 + rank), BY_NAME["KNN"].layers),  # parameters differ
        (BY_NAME["DeepMahalanobis"].make(), ((1, 4),) if rank else ((1, 2),)),  # layers differ
    )
    for score, layers in cases:
        try:
            score.fit(
                _rec(make_net(), layers),
                shard,
                distributed=True,
            )
        except DistributedMismatchError as exc:
            messages.append(str(exc))
        else:
            messages.append("no error")
        assert not score.is_fit
    # the group still works after the errors: a consistent fit succeeds
    knn = BY_NAME["KNN"].make()
    knn.fit(
        _rec(make_net(), BY_NAME["KNN"].layers),
        shard,
        distributed=True,
    )
    messages.append(f"fit on {knn._fit_n_samples}")
    return messages


def test_mismatched_ranks_raise_on_every_rank_without_hanging(tmp_path: Path) -> None:
    results = run_ranks(_mismatch_worker, tmp_path)
    for status, messages in results:
        assert status == "ok", messages
        params, layers, final = messages
        assert "hyper-parameters" in params and "k=2," in params and "k=3," in params
        assert "(1, 2)" in layers and "(1, 4)" in layers
        assert final == f"fit on {N}"


def _broken(batches: list[tuple[Tensor, Tensor]], after: int) -> Any:
    """The batches, then a failing data loader after ``after`` of them."""
    yield from batches[:after]
    msg = "broken shard"
    raise OSError(msg)


def _failure_worker(rank: int) -> list[str]:
    """Rank 1's data loader fails (mid-stream, then at its first batch): rank 0 must raise
    instead of waiting in the merge; rank 1 raises its own error."""
    x, y, _ = _data()
    shard = _batches(x, y, *SCENARIOS["uneven"][rank])
    messages = []
    entry = BY_NAME["KNN"]
    runs = (
        lambda data: entry.make().fit(_rec(make_net(), entry.layers), data, distributed=True),
        lambda data: fit_jointly(
            [(entry.make(), entry.layers), (BY_NAME["DeepMahalanobis"].make(), ((1, 4),))],
            make_net(),
            data,
            distributed=True,
        ),
    )
    for run in runs:
        for after in (1, 0):
            data = _broken(shard, after) if rank == 1 else shard
            try:
                run(data)
            except (DistributedMismatchError, OSError) as exc:
                messages.append(f"{type(exc).__name__}: {exc}")
            else:
                messages.append("no error")
    knn = entry.make().fit(_rec(make_net(), entry.layers), shard, distributed=True)
    messages.append(f"fit on {knn._fit_n_samples}")  # the group still works
    return messages


def test_a_failing_rank_releases_the_others(tmp_path: Path) -> None:
    results = run_ranks(_failure_worker, tmp_path)
    assert [status for status, _ in results] == ["ok", "ok"], results
    (_, healthy), (_, failing) = results
    assert healthy[-1] == failing[-1] == f"fit on {N}"
    for message in healthy[:-1]:
        assert message.startswith("DistributedMismatchError"), message
        assert "failed on another rank" in message and "rank 1: OSError: broken shard" in message
    assert all(message == "OSError: broken shard" for message in failing[:-1]), failing


def _group_worker(rank: int) -> int:
    """A sub-group given explicitly (here: both ranks) is used for the merge."""
    x, y, _ = _data()
    group = dist.new_group([0, 1])
    knn = BY_NAME["KNN"].make()
    rnet = _rec(make_net(), BY_NAME["KNN"].layers)
    knn.fit(rnet, _batches(x, y, *SCENARIOS["uneven"][rank]), distributed=group)
    return knn.index.ntotal


def test_explicit_process_group(tmp_path: Path) -> None:
    assert run_ranks(_group_worker, tmp_path) == [("ok", N), ("ok", N)]


def test_distributed_without_process_group_says_how_to_initialise() -> None:
    x, y, _ = _data()
    score = BY_NAME["KNN"].make()
    rnet = _rec(make_net(), BY_NAME["KNN"].layers)
    with pytest.raises(RuntimeError, match="init_process_group") as info:
        score.fit(rnet, x, y, distributed=True)
    assert "torchrun" in str(info.value)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fit_jointly(
            [(BY_NAME["KNN"].make(), BY_NAME["KNN"].layers)], make_net(), x, y, distributed=True
        )
    assert not score.is_fit
    with pytest.raises(TypeError, match="`distributed` must be a bool or a torch.distributed"):
        score.fit(rnet, x, y, distributed="yes")


def _nccl_worker(rank: int) -> list[str]:
    """One NCCL rank on the GPU: the merge's collectives run on CUDA tensors (NCCL cannot
    put two ranks on one GPU, so a single-GPU machine tests one rank)."""
    torch.cuda.set_device(rank)
    x, y, queries = (t.cuda() for t in _data())
    problems = []
    for name in ("KNN-bank", "DeepMahalanobis", "ReAct", "Trust", "NNGuide"):
        entry = next(e for e in (*EXTRA, *CATALOGUE) if e.name == name)
        net = make_net().cuda()
        single = entry.make().fit(_rec(net, entry.layers), _batches(x, y, 0, N))
        merged = entry.make().fit(_rec(net, entry.layers), _batches(x, y, 0, N), distributed=True)
        got, expected = merged(queries)[1], single(queries)[1]
        if got.device.type != "cuda" or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            problems.append(name)
    return problems


@pytest.mark.skipif(
    not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs CUDA and NCCL"
)
def test_nccl_backend_on_one_gpu(tmp_path: Path) -> None:
    results = run_ranks(_nccl_worker, tmp_path, backend="nccl", world=1)
    assert results == [("ok", [])], results
