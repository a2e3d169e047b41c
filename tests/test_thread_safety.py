"""One fitted score serves many threads: every concurrent call gives exactly the sequential
result, nothing raises, and the network is left as it was (hooks, modes, flags)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from torch import nn

from scio.recorder import Recorder
from scio.scores import KNN, BaseScore, DeepMahalanobis, JointInference, Softmax, ViM
from tests.catalogue import CATALOGUE, Entry
from tests.conftest import make_net

N_THREADS = 8
N_CALLS = 20


def _data() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    net = make_net(dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(40, 1, 4, 4, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        labels = net(calib).argmax(1)
    # distinct batches of distinct sizes, so a mixed-up call cannot go unnoticed
    batches = [
        torch.randn(3 + i % 5, 1, 4, 4, generator=generator, dtype=torch.float64)
        for i in range(N_CALLS)
    ]
    return net, calib, labels, batches


def _fit(entry: Entry, net: nn.Module, calib: torch.Tensor, labels: torch.Tensor) -> BaseScore:
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record(*entry.layers)
    return entry.make().fit(rnet, calib, labels if entry.uses_labels else None)


def _hooks(net: nn.Module) -> list[int]:
    return [len(module._forward_hooks) for module in net.modules()]


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(
        torch.equal(x, y) or torch.allclose(x, y, 0, 0, equal_nan=True) for x, y in zip(a, b)
    )


def _hammer(call: Any, batches: list[torch.Tensor]) -> tuple[list[Any], list[BaseException]]:
    """``N_THREADS`` threads each make ``N_CALLS`` calls, every thread in its own order,
    started together; returns ``(thread, batch index, result)`` and the exceptions."""
    barrier = threading.Barrier(N_THREADS)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(thread: int) -> None:
        barrier.wait()
        for step in range(N_CALLS):
            i = (step * (thread + 1) + thread) % N_CALLS
            try:
                result = call(batches[i])
            except BaseException as exc:
                with lock:
                    errors.append(exc)
            else:
                with lock:
                    results.append((thread, i, result))

    with ThreadPoolExecutor(N_THREADS) as pool:
        list(pool.map(work, range(N_THREADS)))
    return results, errors


@pytest.mark.parametrize("entry", CATALOGUE, ids=lambda e: e.name)
def test_every_score_is_thread_safe(entry: Entry) -> None:
    net, calib, labels, batches = _data()
    score = _fit(entry, net, calib, labels)
    expected = [score(batch) for batch in batches]
    hooks = _hooks(net)
    flags = [p.requires_grad for p in net.parameters()]
    n_entries = len(score.timer.inference)

    results, errors = _hammer(score, batches)

    assert not errors, f"{entry.name}: {errors[0]!r}"
    mismatches = [(t, i) for t, i, result in results if not _same(result, expected[i])]
    assert not mismatches, f"{entry.name}: {len(mismatches)} calls differ from sequential"
    assert len(results) == N_THREADS * N_CALLS
    assert _hooks(net) == hooks  # no hook added or left behind
    assert [p.requires_grad for p in net.parameters()] == flags
    assert not any(module.training for module in net.modules())
    # the timer counted every call (bounded window, far from full here)
    assert len(score.timer.inference) == n_entries + N_THREADS * N_CALLS


def test_joint_inference_of_five_scores_is_thread_safe() -> None:
    net, calib, labels, batches = _data()
    names = ("Softmax", "KNN", "DeepMahalanobis", "ViM", "ReAct")
    by_name = {entry.name: entry for entry in CATALOGUE}
    scores = [_fit(by_name[name], net, calib, labels) for name in names]
    joint = JointInference(scores)
    expected = [joint(batch) for batch in batches]
    results, errors = _hammer(joint, batches)
    assert not errors, repr(errors[0])
    for _, i, result in results:
        for got, want in zip(result, expected[i]):
            assert _same(got, want)
    assert len(results) == N_THREADS * N_CALLS


def test_training_network_is_scored_in_eval_mode_and_restored() -> None:
    """Threads sharing a network left in training mode: every call runs in eval mode, and
    the last call out restores the user's flags (never one thread under another's feet)."""
    net, calib, _, batches = _data()
    net.dropout = nn.Dropout(0.5)  # unused by forward: only its flag matters
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    score = KNN(k=3).fit(rnet, calib)
    expected = [score(batch) for batch in batches]
    net.train()
    net.fc.eval()
    with pytest.warns(UserWarning, match="training mode"):
        results, errors = _hammer(score, batches)
    assert not errors
    assert all(_same(result, expected[i]) for _, i, result in results)
    assert net.training and net.conv.training and not net.fc.training


def test_gradient_scores_restore_parameter_flags_under_threads() -> None:
    net, calib, labels, batches = _data()
    net.conv.weight.requires_grad_(False)
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    score = DeepMahalanobis(epsilon=0.01).fit(rnet, calib, labels)
    expected = [score(batch) for batch in batches]
    results, errors = _hammer(score, batches)
    assert not errors
    assert all(_same(result, expected[i]) for _, i, result in results)
    assert [p.requires_grad for p in net.parameters()] == [False, True, True, True]
    assert all(p.grad is None for p in net.parameters())


def test_recorder_activations_are_the_calling_threads_own() -> None:
    net, calib, _, batches = _data()
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 2), (1, 4))
    expected = []
    for batch in batches:
        rnet(batch)
        expected.append({k: v.clone() for k, v in rnet.activations.items()})

    def call(batch: torch.Tensor) -> dict[Any, torch.Tensor]:
        rnet(batch)
        return dict(rnet.activations)

    results, errors = _hammer(call, batches)
    assert not errors
    for _, i, acts in results:
        assert list(acts) == list(expected[i])
        assert all(torch.equal(acts[k], expected[i][k]) for k in acts)


def test_capture_is_returned_per_call() -> None:
    net, calib, _, batches = _data()
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    first = rnet.capture(batches[0])
    second = rnet.capture(batches[1])
    assert torch.equal(first.out, net(batches[0]))
    assert torch.equal(
        first.activations[(1, 4)], net.flatten(net.pool(net.softplus(net.conv(batches[0]))))
    )
    assert first.activations[(1, 4)].shape[0] == len(batches[0])
    assert second.activations[(1, 4)].shape[0] == len(batches[1])
    assert dict(rnet.activations).keys() == second.activations.keys()


def test_concurrent_fits_of_two_scores_on_one_recorder_equal_sequential() -> None:
    net, calib, labels, batches = _data()
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    makers = (lambda: KNN(k=3), lambda: DeepMahalanobis(), lambda: ViM(), lambda: Softmax())
    sequential = [make().fit(rnet, calib, labels) for make in makers]
    expected = [[score(batch) for batch in batches[:5]] for score in sequential]
    for _ in range(3):
        fresh = [make() for make in makers]
        barrier = threading.Barrier(len(fresh))

        def fit(score: BaseScore, barrier: threading.Barrier = barrier) -> BaseScore:
            barrier.wait()
            return score.fit(rnet, calib, labels)

        with ThreadPoolExecutor(len(fresh)) as pool:
            fitted = list(pool.map(fit, fresh))
        for score, want in zip(fitted, expected):
            for batch, result in zip(batches[:5], want):
                assert _same(score(batch), result), type(score).__name__
