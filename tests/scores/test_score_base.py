"""Score framework: parameters, life cycle, batches, joint fitting, modes, timer."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from tests.conftest import make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores import KNN, BaseScore, BaseScoreClassif, fit_jointly
from scio.scores.classification import TemplateClassif
from scio.scores.classification.base import _postprocess_conformity
from scio.scores.core.base import StreamingCalibration
from scio.scores.core.calibration import CalibBatch, CalibState, validate_labels


class Recorded(BaseScoreClassif):
    """Reference-style score: stores what calibrate received; conformity = sum of logits."""

    offset: float = 0.0
    required: int

    def calibrate(self, calib_data: Tensor, calib_labels: Any) -> None:
        self.seen = (calib_data.clone(), calib_labels)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        return out, out.sum(1) + self.offset


class MeanFeature(StreamingCalibration, BaseScoreClassif):
    """Streaming score: negative distance to the mean calibration feature."""

    def _calib_update(self, batch: CalibBatch) -> None:
        (features,) = self.normalize(batch.activations, concatenate=True)
        self._state.add("sum", features.sum(0))
        self._state.add("count", torch.tensor(len(features)))

    def _calib_end(self) -> None:
        self.mean = self._state.sum("sum") / self._state.sum("count")

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        (features,) = self.activations(concatenate=True)
        return out, -(features - self.mean).norm(dim=1)


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(30, 1, 4, 4, generator=generator)
    y = torch.randint(0, 3, (30,), generator=generator)
    return x, y


@pytest.fixture
def rnet(data: tuple[Tensor, Tensor]) -> Recorder:
    rnet = Recorder(make_net(), input_data=data[0][[0]])
    rnet.record((1, 3), (1, 5))
    return rnet


def test_abstract_methods_message() -> None:
    """Python 3.12's wording on every version (3.11 words it otherwise), as the reference's
    tests pin it."""
    msg = (
        "Can't instantiate abstract class BaseScore without an implementation for abstract "
        "methods 'calibrate', 'get_conformity'"
    )
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        BaseScore()  # type: ignore[abstract]


class NoNetwork(BaseScore):
    """Reference-contract score that never runs a network."""

    def calibrate(self, calib_data: Tensor, calib_labels: Any) -> None:
        self.mean = calib_data.mean()

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        return inputs, (inputs - self.mean).abs()


def test_placeholder_recorder_for_a_score_that_needs_no_network() -> None:
    """As the reference, a score written against its contract takes any placeholder ``rnet``
    (e.g. ``...``): the network is used only where the score's own code uses it."""
    calib = torch.arange(4.0)
    score = NoNetwork().fit(..., calib, ...)
    assert score.rnet is Ellipsis
    assert repr(score) == "NoNetwork[fit](act_norm=None)"
    (stat,) = score.timer.calibration
    assert stat.n_samples == 4
    out, conformity = score(torch.tensor([1.5, 5.0]))
    assert out.tolist() == [1.5, 5.0]
    torch.testing.assert_close(conformity, torch.tensor([0.0, 3.5]))
    assert score.timer.inference[-1].n_samples == 2
    with pytest.raises(RuntimeError, match="Missing parameters for Recorded score"):
        Recorded().fit(..., calib, ...)
    # a plain network is still refused with the hint, and so is a placeholder for a score
    # that streams its calibration through the recorder
    with pytest.raises(TypeError, match=r"`rnet` must be a scio Recorder \(got ellipsis\)"):
        KNN(k=1).fit(..., calib[:, None], None)
    with pytest.raises(TypeError, match=r"got a plain nn.Module"):
        NoNetwork().fit(make_net(), calib, None)


def test_fit_required_and_repr(rnet: Recorder, data: tuple[Tensor, Tensor]) -> None:
    score = Recorded(required=1)
    assert repr(score) == "Recorded[unfit](act_norm=None, mode='raw', offset=0.0, required=1)"
    assert str(score) == "Recorded(required=1)"
    with pytest.raises(RuntimeError, match="^The score needs to be fit before inference$"):
        score(data[0])
    with pytest.raises(AttributeError, match="call `fit` first"):
        _ = score.rnet
    assert score.fit(rnet, *data) is score
    assert repr(score).startswith("Recorded[fit](")
    assert score.rnet is rnet
    assert torch.equal(score.seen[0], data[0]) and score.seen[1] is data[1]


def test_param_changes_unfit(rnet: Recorder, data: tuple[Tensor, Tensor]) -> None:
    score = Recorded(required=1).fit(rnet, *data)
    score.offset = 0.0  # same value: stays fit
    assert score.is_fit
    score.mode = "diff"  # mode never unfits
    assert score.is_fit
    score.offset = 1.0
    assert not score.is_fit
    score.fit(rnet, *data)
    score.unfit()
    assert not score.is_fit


def test_missing_params_and_act_norm_checks(rnet: Recorder, data: tuple[Tensor, Tensor]) -> None:
    with pytest.raises(
        RuntimeError, match=r"^Missing parameters for Recorded score: \('required',\)$"
    ):
        Recorded().fit(rnet, *data)
    for bad in (0.0, float("nan")):
        with pytest.raises(AssertionError):
            Recorded(required=1, act_norm=bad).fit(rnet, *data)


def test_failed_calibration_leaves_unfit_and_untimed(
    rnet: Recorder, data: tuple[Tensor, Tensor]
) -> None:
    class Failing(Recorded):
        def calibrate(self, calib_data: Tensor, calib_labels: Any) -> None:
            raise ZeroDivisionError

    score = Failing(required=1)
    with pytest.raises(ZeroDivisionError):
        score.fit(rnet, *data)
    assert not score.is_fit
    assert score.timer.stats == ()


def test_conformity_broadcast_and_modes(rnet: Recorder, data: tuple[Tensor, Tensor]) -> None:
    score = Recorded(required=1).fit(rnet, *data)
    out, conformity = score(data[0])
    assert out.shape == conformity.shape == (30, 3)
    assert torch.equal(conformity[:, 0], conformity[:, 2])
    with pytest.raises(ValueError, match="'nope' is not a valid ScoreClassifMode"):
        score.mode = "nope"
        score(data[0])


def test_postprocess_explicit_values() -> None:
    rows = torch.tensor([[1.0, 2, 3], [2, 2, 1], [1, 2, 1]])
    assert _postprocess_conformity(rows, "raw") is rows
    torch.testing.assert_close(
        _postprocess_conformity(rows, "diff"),
        torch.tensor([[-2.0, -1, 1], [0, 0, -1], [-1, 1, -1]]),
    )
    torch.testing.assert_close(
        _postprocess_conformity(rows, "ratio"),
        torch.tensor([[1 / 3, 2 / 3, 1.5], [1, 1, 0.5], [0.5, 2, 0.5]]),
    )
    for dtype in (torch.float16, torch.float64):
        assert _postprocess_conformity(rows.to(dtype), "diff").dtype == dtype
        assert _postprocess_conformity(rows.to(dtype), "ratio").dtype == dtype


def test_postprocess_infinite_conformities_are_not_nan() -> None:
    """A class-independent -inf (e.g. SHE's fallback) broadcast to every class: equal
    entries give 0 (diff) / 1 (ratio), not inf - inf = NaN; unequal ones stay infinite."""
    inf = math.inf
    rows = torch.tensor([[-inf, -inf, -inf], [1.0, -inf, 2.0], [inf, inf, 0.0]])
    torch.testing.assert_close(
        _postprocess_conformity(rows, "diff"),
        torch.tensor([[0.0, 0, 0], [-1, -inf, 1], [0, 0, -inf]]),
    )
    torch.testing.assert_close(
        _postprocess_conformity(rows, "ratio"),
        torch.tensor([[1.0, 1, 1], [0.5, -inf, 2], [1, 1, 0]]),
    )


def test_activations_concatenate_and_normalisation(
    rnet: Recorder, data: tuple[Tensor, Tensor]
) -> None:
    score = Recorded(required=1, act_norm=2.0).fit(rnet, *data)
    score(data[0])
    per_layer = score.activations()
    assert len(per_layer) == 2
    assert per_layer[0].shape == (30, 2, 2, 2)
    torch.testing.assert_close(per_layer[0].flatten(1).norm(dim=1), torch.ones(30))
    (both,) = score.activations(concatenate=True)
    assert both.shape == (30, 8 + 3)
    torch.testing.assert_close(both.norm(dim=1), torch.ones(30))
    score.act_norm = None
    raw = score.activations()
    assert raw[1] is rnet.activations[(1, 5)]


def test_timer_and_reset(rnet: Recorder, data: tuple[Tensor, Tensor]) -> None:
    score = Recorded(required=1).fit(rnet, *data)
    score(data[0][:4])
    assert [(s.op.value, s.n_samples) for s in score.timer.stats] == [
        ("calibration", 30),
        ("inference", 4),
    ]
    score.reset_timer()
    assert score.timer.stats == ()


@pytest.mark.parametrize("batch_size", [1, 7, 30])
def test_dataloader_fit_equals_tensor_fit(
    rnet: Recorder, data: tuple[Tensor, Tensor], batch_size: int
) -> None:
    loader = DataLoader(TensorDataset(*data), batch_size=batch_size)
    ref = MeanFeature(act_norm=2.0).fit(rnet, *data)
    streamed = MeanFeature(act_norm=2.0).fit(rnet, loader)
    torch.testing.assert_close(streamed.mean, ref.mean)
    assert streamed.timer.calibration[0].n_samples == 30
    # reference-style scores receive the concatenated batches
    legacy = Recorded(required=1).fit(rnet, loader)
    assert torch.equal(legacy.seen[0], data[0])
    assert torch.equal(legacy.seen[1], data[1])


def test_fit_from_generator_checks_params_after_stream(
    rnet: Recorder, data: tuple[Tensor, Tensor]
) -> None:
    batches = ((data[0][i : i + 7], data[1][i : i + 7]) for i in range(0, 30, 7))
    score = KNN(k=30).fit(rnet, batches)
    assert score.timer.calibration[0].n_samples == 30
    with pytest.raises(AssertionError):
        KNN(k=31).fit(rnet, iter([(data[0], data[1])]))


def test_fit_input_errors(rnet: Recorder, data: tuple[Tensor, Tensor]) -> None:
    with pytest.raises(ValueError, match="`calib_labels` must be None"):
        KNN(k=1).fit(rnet, DataLoader(TensorDataset(*data)), data[1])
    with pytest.raises(TypeError, match="`calib_data` must be a tensor or an iterable"):
        KNN(k=1).fit(rnet, 3)
    with pytest.raises(TypeError, match="Calibration batch 0"):
        KNN(k=1).fit(rnet, [("a", "b", "c")])
    with pytest.raises(ValueError, match="`calib_data` must hold at least one sample"):
        KNN(k=1).fit(rnet, [])


def test_fit_jointly_equals_individual_fits(data: tuple[Tensor, Tensor]) -> None:
    net = make_net()
    pairs = [
        (MeanFeature(act_norm=2.0), [(1, 3)]),
        (KNN(k=3), [(1, 5), (1, 3)]),
        (KNN(k=2), ["fc"]),
    ]
    calls: list[int] = []
    fitted = fit_jointly(pairs, net, data[0], data[1], batch_size=7, on_batch=calls.append)
    assert calls == [7, 14, 21, 28, 30]
    assert [score for score, _ in pairs] == fitted
    test = torch.rand(5, 1, 4, 4)
    for score, layers in pairs:
        rnet = Recorder(net, input_data=data[0][[0]])
        rnet.record(*layers)
        assert score.rnet.recording == rnet.recording
        twin = type(score)(**score.params).fit(rnet, *data)
        out, conf = score(test)
        out2, conf2 = twin(test)
        torch.testing.assert_close(out, out2)
        torch.testing.assert_close(conf, conf2)
        assert score.timer.calibration[0].n_samples == 30


def test_calib_state_merge() -> None:
    a, b = CalibState(), CalibState()
    a.append("x", torch.tensor([1.0, 2.0]))
    b.append("x", torch.tensor([3.0]))
    a.add("s", torch.tensor(1.0))
    b.add("s", torch.tensor(2.0))
    b.add("t", torch.tensor(5.0))
    merged = a.merge(b)
    assert torch.equal(merged.cat("x"), torch.tensor([1.0, 2.0, 3.0]))
    assert merged.sum("s") == 3 and merged.sum("t") == 5
    assert "x" in merged and "nope" not in merged


def test_validate_labels() -> None:
    assert validate_labels(torch.tensor([0, 2]), 2, 3).dtype == torch.int64
    assert validate_labels([0, 1], 2, 3).tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"`calib_labels` must have shape \(3,\)"):
        validate_labels(torch.tensor([0, 1]), 3, 3)
    with pytest.raises(ValueError, match="integer dtype"):
        validate_labels(torch.tensor([0.0, 1.0]), 2, 3)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 3\).*\[5\]"):
        validate_labels(torch.tensor([0, 5]), 2, 3)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        validate_labels(torch.tensor([-1, 0]), 2, 3)
    with pytest.raises(TypeError, match="1-D integer tensor"):
        validate_labels(object(), 2, 3)


def test_template_classif() -> None:
    template = TemplateClassif()
    assert template.missing_params == ("param_with_no_default_value",)
    assert template.param_with_a_default_value == "default value"
    with pytest.raises(NotImplementedError):
        template.calibrate(torch.zeros(1), None)
    with pytest.raises(NotImplementedError):
        template.get_conformity(torch.zeros(1))
