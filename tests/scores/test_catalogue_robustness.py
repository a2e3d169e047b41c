"""Reliability of every algorithm: save/load, bad input, no side effects, determinism."""

from __future__ import annotations

import gc
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.catalogue import CATALOGUE, Entry
from tests.conftest import TinyConvNet, make_net
from torch import Tensor

import scio
from scio.recorder import Recorder
from scio.scores import KNN, Softmax
from scio.scores.core.base import NoCalibration
from scio.serialization import FORMAT_VERSION, ScoreFileError, load_score

ENTRIES = [pytest.param(entry, id=entry.name) for entry in CATALOGUE]
K_ENTRIES = [pytest.param(e, id=e.name) for e in CATALOGUE if "k" in e.factory().params]
LABEL_ENTRIES = [pytest.param(e, id=e.name) for e in CATALOGUE if e.uses_labels]


def _data(n: int = 40, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    calib = torch.rand(n, 1, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    test = torch.rand(8, 1, 4, 4, generator=generator)
    return calib, labels, test


def _fit(entry: Entry, net: torch.nn.Module, calib: Tensor, labels: Tensor) -> Any:
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*entry.layers)
    return entry.make().fit(rnet, calib, labels)


# -- save / load -----------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ENTRIES)
def test_save_load_round_trip(entry: Entry, tmp_path: Path) -> None:
    net = make_net()
    calib, labels, test = _data()
    score = _fit(entry, net, calib, labels)
    path = tmp_path / "score.pt"
    score.save(path)  # before inference: randomised scores (Odds) save their RNG state
    _, expected = score(test)

    loaded = scio.load_score(path, net)
    assert type(loaded) is type(score)
    assert loaded.params.keys() == score.params.keys()
    assert repr(loaded) == repr(score)
    assert loaded.rnet.recording == score.rnet.recording
    _, conformity = loaded(test)
    torch.testing.assert_close(conformity, expected, rtol=0, atol=0, equal_nan=True)

    fresh = make_net(seed=1)  # a fresh instance of the same architecture, same weights
    fresh.load_state_dict(net.state_dict())
    _, conformity = load_score(path, fresh)(test)
    torch.testing.assert_close(conformity, expected, rtol=0, atol=0, equal_nan=True)

    double = make_net().double()
    double.load_state_dict(net.state_dict())
    loaded64 = load_score(path, double)
    out64, conformity64 = loaded64(test.double())
    assert out64.dtype == conformity64.dtype == torch.float64
    if entry.name == "Odds":
        return  # its noise is drawn in the input dtype: float64 draws differ by design
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(conformity64))
    torch.testing.assert_close(conformity64[finite].float(), expected[finite], rtol=2e-3, atol=2e-3)


def test_load_refuses_other_algorithm_version_and_shapes(tmp_path: Path) -> None:
    net = make_net()
    calib, labels, _ = _data()
    path = tmp_path / "knn.pt"
    _fit(Entry("KNN", lambda: KNN(k=2), ((1, 4), (1, 5))), net, calib, labels).save(path)
    with pytest.raises(ScoreFileError, match="holds a KNN score, not a Softmax"):
        load_score(path, net, expected=Softmax)
    other = make_net(n_classes=4)  # same layer ids, other shapes
    with pytest.raises(ScoreFileError, match=r"per-sample shapes \[\[8\], \[4\]\]"):
        load_score(path, other)
    with pytest.raises(ScoreFileError, match="cannot process inputs of the calibration"):
        load_score(path, make_net(size=6), input_size=(1, 1, 6, 6), device="cpu")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(ScoreFileError, match="format version"):
        load_score(tmp_path / "future.pt", net)
    payload["format_version"] = FORMAT_VERSION
    payload["class"] = "os.system"
    torch.save(payload, tmp_path / "unknown.pt")
    with pytest.raises(ScoreFileError, match="unknown class 'os.system'"):
        load_score(tmp_path / "unknown.pt", net)
    (tmp_path / "garbage.pt").write_bytes(b"not a score")
    with pytest.raises(ScoreFileError):
        load_score(tmp_path / "garbage.pt", net)
    with pytest.raises(RuntimeError, match="Only a fitted score can be saved"):
        KNN(k=1).save(tmp_path / "unfit.pt")


class _Payload:
    """Pickling this object runs code when it is unpickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (Path(_MARKER[0]), "pwned"))


_MARKER: list[str] = [""]


def test_malicious_pickle_is_rejected_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "executed.txt"
    _MARKER[0] = str(marker)
    path = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"magic": "scio-score", "format_version": FORMAT_VERSION, "x": _Payload()}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ScoreFileError, match="not a safe scio score file"):
        load_score(path, make_net())
    assert not marker.exists()
    # the payload is real: plain pickle would run it
    pickle.loads(pickle.dumps(_Payload()))
    assert marker.read_text() == "pwned"


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_inputs(entry: Entry) -> None:
    net = make_net()
    calib, labels, test = _data()
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*entry.layers)
    if isinstance(entry.make(), NoCalibration) and not hasattr(entry.make(), "_calib_prepare"):
        # nothing to learn: any calib_data is accepted, as in the reference
        assert entry.make().fit(rnet, calib[:0], labels[:0]).is_fit
        assert entry.make().fit(rnet, (calib * 10).long(), labels).is_fit
    else:
        with pytest.raises(ValueError, match="`calib_data` must hold at least one sample"):
            entry.make().fit(rnet, calib[:0], labels[:0])
        # no dtype check on integer inputs (the reference has none): torch's own error
        with pytest.raises(RuntimeError, match="type"):
            entry.make().fit(rnet, (calib * 10).long(), labels)
        with pytest.raises(RuntimeError, match=r"`calib_data` is float64 but the network compu"):
            entry.make().fit(rnet, calib.double(), labels)
        with pytest.raises(ValueError, match=r"`calib_data` samples must have shape \(1, 4, 4"):
            entry.make().fit(rnet, [(calib[:5], labels[:5]), (calib[:5, :, :3], labels[:5])])
    score = entry.make().fit(rnet, calib, labels)
    with pytest.raises(
        ValueError, match=r"`inputs` samples must have shape \(1, 4, 4\).*got \(1, 4, 3\)"
    ):
        score(test[:, :, :, :3])
    with pytest.raises(RuntimeError):  # integer inputs reach the network, as in the reference
        score(test.long())
    with pytest.raises(TypeError, match="`inputs` must be a torch.Tensor"):
        score(test.numpy())
    with pytest.raises(ValueError, match="`inputs` is on meta but the network is on cpu"):
        score(test.to("meta"))


@pytest.mark.parametrize("entry", LABEL_ENTRIES)
def test_bad_labels(entry: Entry) -> None:
    if entry.name == "Gram":
        entry = Entry(entry.name, lambda: scio.scores.Gram(calib_labels="true"), entry.layers, True)
    net = make_net()
    calib, labels, _ = _data()
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*entry.layers)
    bad_cases = [
        (labels[:-1], r"`calib_labels` must have shape \(40,\)"),
        (labels.float(), "`calib_labels` must have an integer dtype"),
        (labels + 3, r"`calib_labels` values must lie in \[0, 3\)"),
        (-labels - 1, r"`calib_labels` values must lie in \[0, 3\)"),
    ]
    for bad, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            entry.make().fit(rnet, calib, bad)


@pytest.mark.parametrize("entry", K_ENTRIES)
def test_k_larger_than_calibration(entry: Entry) -> None:
    net = make_net()
    calib, labels, _ = _data(n=5)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*entry.layers)
    with pytest.raises(ValueError, match=r"`k` must satisfy 0 < k <= n_calib = 5 .*\(got k=6\)"):
        entry.make(k=6).fit(rnet, calib, labels)
    with pytest.raises(AssertionError):  # reference-compatible exception type
        entry.make(k=6).fit(rnet, calib, labels)


@pytest.mark.parametrize("entry", ENTRIES)
def test_nan_and_inf_inputs(entry: Entry) -> None:
    """Non-finite inputs never raise (docs/errors.md): the sample gets a NaN conformity and
    the others are bit-identical to the batch without it (the score runs on those alone)."""
    net = make_net()
    calib, labels, test = _data()
    score = _fit(entry, net, calib, labels)
    for value in (float("nan"), float("inf")):
        bad = test.clone()
        bad[0, 0, 0, 0] = value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, conformity = score(bad)
        assert conformity.shape == (8, 3)
        assert conformity[0].isnan().all()
        _, clean = score(test[1:])
        torch.testing.assert_close(conformity[1:], clean, rtol=0, atol=0, equal_nan=True)


def test_trust_batch_rounding_is_float32_gemm_error() -> None:
    """The tolerance above is justified: both batch sizes are within float32 error of the
    float64 computation of the same score (batch-independent math)."""
    import copy

    entry = next(e for e in CATALOGUE if e.name == "Trust")
    net = make_net()
    calib, labels, test = _data()
    score32 = _fit(entry, net, calib, labels)
    score64 = _fit(entry, copy.deepcopy(net).double(), calib.double(), labels)
    _, exact = score64(test[1:].double())
    _, alone = score32(test[1:])
    _, in_batch = score32(test)
    for result in (alone, in_batch[1:]):
        relative = ((result.double() - exact).abs() / exact.abs()).max()
        assert relative < 5e-5


# -- no side effects -------------------------------------------------------------------------
def _snapshot(net: TinyConvNet) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in net.named_parameters()},
        "training": {name: m.training for name, m in net.named_modules()},
    }


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("entry", ENTRIES)
def test_no_side_effects(entry: Entry, training: bool) -> None:
    net = make_net()
    net.conv.bias.requires_grad_(False)
    net.train(training)
    if training:
        net.pool.training = False  # a mixed state must be restored exactly
    calib, labels, test = _data()
    before = _snapshot(net)
    inputs = [calib, labels, test]
    copies = [t.clone() for t in inputs]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = _fit(entry, net, calib, labels)
        score(test)
    train_warnings = [w for w in caught if "training mode" in str(w.message)]
    assert bool(train_warnings) == training
    after = _snapshot(net)
    assert after["grad"] == before["grad"]
    assert after["training"] == before["training"]
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for tensor, copy in zip(inputs, copies, strict=True):
        assert torch.equal(tensor, copy)
        assert not tensor.requires_grad
        assert tensor.grad is None
    assert all(p.grad is None for p in net.parameters())
    del score
    gc.collect()
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


# -- determinism -----------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ENTRIES)
def test_fitting_twice_is_bit_identical(entry: Entry, tmp_path: Path) -> None:
    net = make_net()
    calib, labels, test = _data()
    first = _fit(entry, net, calib, labels)
    second = _fit(entry, net, calib, labels)
    for attr in entry.factory()._fitted_attrs:
        _assert_identical(getattr(first, attr), getattr(second, attr))
    torch.testing.assert_close(first(test)[1], second(test)[1], rtol=0, atol=0, equal_nan=True)


def _assert_identical(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_identical(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_identical(a[key], b[key])
    elif hasattr(a, "samples"):
        _assert_identical(a.samples, b.samples)
    else:
        assert a == b
