"""``as_module(score)``: every catalogue score as one eager module equal to ``score(x)``, with
no hooks, no recorder, nothing changed per call, and its state following ``.to()``."""

from __future__ import annotations

import copy
import pickle
import threading
import warnings

import pytest
import torch
from torch import nn

from scio.export import ExportError, ScoreModule, as_module
from scio.recorder import Recorder
from scio.scores import KNN, ODIN, DeepMahalanobis, GradNorm, Softmax
from tests.catalogue import BY_NAME, CATALOGUE, Entry
from tests.export.helpers import data, fit, hook_counts


@pytest.mark.parametrize("entry", CATALOGUE, ids=lambda e: e.name)
def test_module_equals_score(entry: Entry) -> None:
    score = fit(entry)
    net = score.rnet.net
    hooks = hook_counts(net)
    x = data()[3]
    expected = score(x)
    module = as_module(score)
    assert isinstance(module, ScoreModule)
    assert not module.training
    assert hook_counts(module) == [0] * len(hook_counts(module))  # no hooks on the copy
    state = {k: v.clone() for k, v in module.state_dict().items()}
    out, conformity = module(x)
    torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(conformity, expected[1], atol=1e-5, rtol=0, equal_nan=True)
    again = module(x)  # nothing about a call is kept: the same result twice
    torch.testing.assert_close(again[1], conformity, atol=0, rtol=0, equal_nan=True)
    after = module.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) or bool(v.isnan().any()) for k, v in state.items())
    assert hook_counts(net) == hooks  # the user's network is left as it was
    torch.testing.assert_close(score(x)[1], expected[1], atol=0, rtol=0, equal_nan=True)


def test_module_holds_a_copy_of_the_network_and_the_state_as_buffers() -> None:
    score = fit(BY_NAME["KNN"])
    net = score.rnet.net
    module = as_module(score)
    weights = {id(p) for p in net.parameters()}
    assert not weights & {id(p) for p in module.parameters()}
    samples = [b for name, b in module.named_buffers() if name.endswith("samples")]
    assert len(samples) == 1
    torch.testing.assert_close(samples[0], score.index.samples, atol=0, rtol=0)
    module.train()  # a served score stays in eval mode
    assert not module.training
    assert not any(m.training for m in module.modules())


def test_to_casts_the_network_and_the_fitted_state() -> None:
    score = fit(BY_NAME["DeepMahalanobis"])
    x = data()[3]
    expected = score(x)
    module = as_module(score).to(torch.float64)
    floats = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    assert floats
    assert all(t.dtype == torch.float64 for t in floats)
    out, conformity = module(x.double())
    assert conformity.dtype == torch.float64
    torch.testing.assert_close(out, expected[0].double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conformity, expected[1].double(), atol=1e-4, rtol=1e-4)
    assert score.means[0].dtype == torch.float64  # the score's own state is not touched
    assert next(score.rnet.net.parameters()).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_moves_the_module_to_the_gpu() -> None:  # pragma: no cover - GPU only
    score = fit(BY_NAME["KNN"])
    x = data()[3]
    expected = score(x)
    module = as_module(score).to("cuda")
    assert all(t.is_cuda for t in [*module.parameters(), *module.buffers()])
    _, conformity = module(x.cuda())
    torch.testing.assert_close(conformity.cpu(), expected[1], atol=1e-4, rtol=1e-4)


def test_later_changes_to_the_score_do_not_reach_the_module() -> None:
    score = fit(BY_NAME["KNN"])
    x = data()[3]
    module = as_module(score)
    before = module(x)[1]
    score.set_params(k=1)  # unfits the score
    torch.testing.assert_close(module(x)[1], before, atol=0, rtol=0)


def test_many_threads_share_one_module() -> None:
    score = fit(BY_NAME["ReAct"])
    module = as_module(score)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(2 + i % 4, 1, 4, 4, generator=generator) for i in range(12)]
    expected = [module(b)[1] for b in batches]
    errors: list[BaseException] = []
    results: dict[tuple[int, int], torch.Tensor] = {}

    def work(thread: int) -> None:
        try:
            for step in range(24):
                i = (step * (thread + 1)) % len(batches)
                results[thread, step] = module(batches[i])[1]
                assert torch.equal(results[thread, step], expected[i])
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 6 * 24


@pytest.mark.parametrize(
    ("score", "layers"),
    [
        (ODIN(temperature=2.0, epsilon=0.01), ()),
        (DeepMahalanobis(epsilon=0.01), ((1, 2), (1, 4))),
        (GradNorm(), ((1, 1),)),  # a conv's parameters: per-sample gradients
    ],
    ids=["ODIN", "DeepMahalanobis", "GradNorm-functional"],
)
def test_gradient_scores_run_eagerly(score: object, layers: tuple[tuple[int, int], ...]) -> None:
    net, calib, labels, x = data()
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record(*layers)
    score.fit(rnet, calib, labels)  # type: ignore[attr-defined]
    expected = score(x)  # type: ignore[operator]
    out, conformity = as_module(score)(x)  # type: ignore[arg-type]
    torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(conformity, expected[1], atol=1e-5, rtol=1e-5)


def test_unfitted_score_is_refused() -> None:
    with pytest.raises(ExportError, match="not fitted"):
        as_module(KNN(k=3))
    with pytest.raises(TypeError, match="fitted scio score"):
        as_module(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_score_fitted_without_a_recorder_is_refused() -> None:
    score = Softmax().fit(None, torch.zeros(2, 3))  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="without a scio Recorder"):
        as_module(score)


def test_approximate_index_is_refused() -> None:
    pytest.importorskip("faiss", reason="the approximate backends need faiss")
    net, calib, _, _ = data()
    calib = torch.randn(400, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    rnet = Recorder(net, input_data=calib[:1])
    rnet.record((1, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = KNN(k=3, index_backend="faiss-ivf").fit(rnet, calib)
    with pytest.raises(ExportError, match="approximate 'faiss-ivf' index"):
        as_module(score)


@pytest.mark.parametrize("name", ["Softmax", "KNN", "DeepMahalanobis", "ViM", "ReAct", "ODIN"])
def test_non_finite_samples_as_score(name: str) -> None:
    score = fit(BY_NAME[name])
    x = data()[3].clone()
    x[1, 0, 0, 0] = float("nan")
    x[4, 0, 1, 2] = float("inf")
    x[5, 0, 2] = 3e38  # finite, but the batch sum overflows (the quick check's false alarm)
    expected = score(x)
    out, conformity = as_module(score)(x)
    torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(conformity, expected[1], atol=1e-5, rtol=0, equal_nan=True)
    assert bool(conformity[[1, 4]].isnan().all())
    with torch.inference_mode():  # a server's usual context
        torch.testing.assert_close(as_module(score)(x)[1], expected[1], equal_nan=True)


def test_copies_are_independent_and_pickling_says_what_to_do() -> None:
    module = as_module(fit(BY_NAME["ReAct"]))
    x = data()[3]
    twin = copy.deepcopy(module)
    torch.testing.assert_close(twin(x)[1], module(x)[1], atol=0, rtol=0)
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert not torch.equal(twin(x)[1], module(x)[1])
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(module)
