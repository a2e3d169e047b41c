"""Recorder: the running call's activations, as the reference's post-processors see them.

Inside a call (in a post-processor), ``rnet.activations`` is that call's capture so far, and
assigning the reference's private ``rnet._activations`` replaces that call's activations
only: never another call's, never another thread's, never state on the recorder.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
import torch
from torch import Tensor

from scio.recorder import Recorder
from tests.conftest import TinyConvNet

LAYERS = [(1, 1), (1, 3), (1, 5)]


@pytest.fixture
def x() -> Tensor:
    return torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def rnet(net: TinyConvNet, x: Tensor) -> Recorder:
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record(*LAYERS)
    return rnet


def _missing(layers: list[tuple[int, int]]) -> str:
    msg = (
        f"Missing {layers} activations. This may be due to dynamic control flow, for which "
        "functionality is NOT GUARANTEED!"
    )
    return f"^{re.escape(msg)}$"


def test_post_processor_sees_its_own_call_so_far(rnet: Recorder, x: Tensor) -> None:
    rnet(x[:2])  # an earlier finished call, of another batch size
    seen: list[tuple[list[tuple[int, int]], list[bool], list[int], dict[Any, Tensor]]] = []

    def spy(tensor: Tensor) -> None:
        acts = rnet.activations
        seen.append(
            (
                list(acts),
                [act is tensor for act in acts.values()],
                [len(act) for act in acts.values()],
                rnet._activations,
            )
        )

    rnet(x, activation_postproc=spy)
    assert [keys for keys, *_ in seen] == [LAYERS[:1], LAYERS[:2], LAYERS]
    # the tensor being post-processed is the latest activation of this call (6 samples)
    assert [same for _, same, _, _ in seen] == [[True], [False, True], [False, False, True]]
    assert all(sizes == [6] * len(sizes) for _, _, sizes, _ in seen)
    # the private name is a copy of the same activations, not a live view
    assert [list(copy) for *_, copy in seen] == [LAYERS[:1], LAYERS[:2], LAYERS]
    assert all(type(copy) is dict for *_, copy in seen)
    # once finished, the call is the thread's latest
    assert list(rnet.activations) == LAYERS
    assert all(len(act) == 6 for act in rnet.activations.values())


def test_emptying_activations_in_a_post_processor_fails_that_call(
    rnet: Recorder, x: Tensor
) -> None:
    def remover(_tensor: Tensor) -> None:
        rnet._activations = {}

    with pytest.raises(RuntimeError, match=_missing(LAYERS)):
        rnet(x, activation_postproc=remover)
    assert not rnet.activations  # a failed call leaves no activations

    # emptied after the first layer only: the later layers are still recorded
    def keep(_tensor: Tensor) -> None:
        return None

    with pytest.raises(RuntimeError, match=_missing(LAYERS[:1])):
        rnet(x, activation_postproc=[remover, keep, keep])
    out = rnet(x)  # the recorder is unaffected
    assert list(rnet.activations) == LAYERS
    torch.testing.assert_close(rnet.activations[(1, 5)], out)  # fc is the network's output


def test_assigning_outside_a_call_changes_nothing(rnet: Recorder, x: Tensor) -> None:
    rnet(x)
    before = dict(rnet.activations)
    rnet._activations = {}
    after = rnet.activations
    assert list(after) == list(before)
    assert all(after[layer] is before[layer] for layer in before)
    assert "_activations" not in rnet.__dict__  # no state on the recorder
    rnet(x[:1])  # later calls record as usual
    assert all(len(act) == 1 for act in rnet.activations.values())


def test_another_threads_call_is_never_affected(
    net: TinyConvNet, rnet: Recorder, x: Tensor
) -> None:
    paused = threading.Event()
    resume = threading.Event()
    results: dict[str, Any] = {}

    def pause_once(tensor: Tensor) -> None:
        if not paused.is_set():
            paused.set()  # thread A is now inside its call, one activation captured
            resume.wait(timeout=60)

    def thread_a() -> None:
        try:
            rnet(x, activation_postproc=pause_once)
            results["a"] = dict(rnet.activations)
        except BaseException as exc:  # reported by the main thread
            results["a"] = exc

    def thread_b() -> None:
        def remover(_tensor: Tensor) -> None:
            rnet._activations = {}

        try:
            rnet(x[:3], activation_postproc=remover)
            results["b"] = None
        except RuntimeError as exc:
            results["b"] = exc

    worker_a = threading.Thread(target=thread_a)
    worker_a.start()
    try:
        assert paused.wait(timeout=60)
        worker_b = threading.Thread(target=thread_b)
        worker_b.start()
        worker_b.join(timeout=60)
        rnet._activations = {}  # this thread has no running call: nothing happens
    finally:
        resume.set()
        worker_a.join(timeout=60)
    assert isinstance(results["b"], RuntimeError)
    assert re.search(_missing(LAYERS), str(results["b"]))
    acts = results["a"]
    assert not isinstance(acts, BaseException), acts
    assert list(acts) == LAYERS
    with torch.no_grad():
        conv = net.conv(x)
        pool = net.pool(net.softplus(conv))
        fc = net.fc(net.flatten(pool))
    for layer, expected in zip(LAYERS, (conv, pool, fc), strict=True):
        torch.testing.assert_close(acts[layer], expected)
    assert not rnet.activations  # the main thread never called the recorder
