"""The failure paths a new user hits get one sentence saying what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores import KNN, DeepMahalanobis, FeatureSqueezing, Softmax
from tests.conftest import make_net


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(20, 1, 4, 4, generator=generator), torch.randint(
        0, 3, (20,), generator=generator
    )


def test_scores_without_calibration_accept_any_data_and_a_placeholder_rnet() -> None:
    """As the reference: ``rnet`` stored without inspection, ``fit(rnet, [], labels)`` works."""
    calib, labels = _data()
    placeholder = object()
    for score in (Softmax(), FeatureSqueezing(squeezers=["bits:4"])):
        assert score.fit(placeholder, [], labels) is score  # type: ignore[arg-type]
        assert score.is_fit
        assert score.rnet is placeholder
        assert score.timer.calibration[-1].n_samples == 0
    # with real data the input shape is still learnt (checked at inference, saved with it)
    rnet = Recorder(make_net(), input_data=calib[:1])
    score = Softmax().fit(rnet, calib, labels)
    assert score._fit_input_shape == (1, 4, 4)
    loader = DataLoader(TensorDataset(calib, labels), batch_size=8)
    score = Softmax().fit(rnet, loader)
    assert score._fit_input_shape == (1, 4, 4)
    assert score._fit_n_samples == 20
    out, conformity = score(calib[:3])
    torch.testing.assert_close(conformity, out.softmax(1))


def test_plain_module_instead_of_recorder() -> None:
    calib, labels = _data()
    with pytest.raises(
        TypeError,
        match=r"`rnet` must be a scio Recorder \(got a plain nn.Module, TinyConvNet\): wrap your "
        r"network with `rnet = Recorder\(net, input_data=calib_data\[:1\]\)`",
    ):
        KNN(k=2).fit(make_net(), calib, labels)  # type: ignore[arg-type]


def test_nothing_recorded() -> None:
    calib, labels = _data()
    rnet = Recorder(make_net(), input_data=calib[:1])
    for score in (KNN(k=2), DeepMahalanobis()):
        name = type(score).__name__
        with pytest.raises(
            ValueError, match=f"{name} needs at least one recorded layer.*call `rnet.record"
        ):
            score.fit(rnet, calib, labels)


def test_float64_inputs_to_a_float32_network() -> None:
    calib, labels = _data()
    rnet = Recorder(make_net(), input_data=calib[:1])
    rnet.record((1, 2))
    with pytest.raises(
        RuntimeError,
        match=r"`calib_data` is float64 but the network computes in float32: convert the inputs "
        r"with `calib_data.to\(torch.float32\)`",
    ):
        KNN(k=2).fit(rnet, calib.double(), labels)


def test_numpy_calib_data_with_labels() -> None:
    calib, labels = _data()
    rnet = Recorder(make_net(), input_data=calib[:1])
    rnet.record((1, 2))
    with pytest.raises(
        TypeError, match=r"`calib_data` must be a torch.Tensor when `calib_labels` are given"
    ):
        KNN(k=2).fit(rnet, calib.numpy(), labels)


def test_recorder_built_for_another_input_shape() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    rnet = Recorder(net, input_size=(1, 16))
    rnet.record((1, 1))
    with pytest.raises(
        RuntimeError,
        match=r"failed on `calib_data` samples of shape \(1, 5, 5\), but the Recorder was built "
        r"for samples of shape \(16,\): build it with `Recorder\(net, input_data=calib_data",
    ):
        KNN(k=2).fit(rnet, torch.rand(10, 1, 5, 5), torch.zeros(10, dtype=torch.long))


def test_confidence_is_the_conformity_at_the_predicted_class() -> None:
    calib, labels = _data()
    rnet = Recorder(make_net(), input_data=calib[:1])
    rnet.record((1, 2))
    score = KNN(k=3, mode="diff").fit(rnet, calib, labels)
    out, conformity = score(calib[:7])
    expected = torch.tensor(
        [float(conformity[i, int(out[i].argmax())]) for i in range(7)], dtype=conformity.dtype
    )
    confidence = score.confidence(calib[:7])
    assert confidence.shape == (7,)
    torch.testing.assert_close(confidence, expected, rtol=0, atol=0)
    assert (confidence >= 0).all()  # diff mode: only the predicted class is non-negative
