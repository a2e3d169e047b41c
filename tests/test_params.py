"""ParamClass: paramclasses' ``__post_init__`` arguments and type-checked parameters."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from scio.scores import KNN, Softmax
from scio.scores.classification import BaseScoreClassif
from scio.utils.params import ParamClass


class _PositionalScore(BaseScoreClassif):
    """A score whose ``__post_init__`` takes positional arguments (issue 13, item 1)."""

    def __post_init__(self, *args: Any) -> None:
        self.extra = args

    def calibrate(self, calib_data: torch.Tensor, calib_labels: torch.Tensor) -> None:
        pass

    def get_conformity(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.rnet(inputs)
        return out, out


def test_score_positional_arguments_go_to_post_init() -> None:
    score = _PositionalScore([3, "a"], mode="diff")
    assert score.extra == (3, "a")
    assert score.mode == "diff"
    assert _PositionalScore().extra == ()


def test_post_init_args_and_kwargs() -> None:
    seen: list[Any] = []

    class Both(ParamClass):
        x: int = 0

        def __post_init__(self, a: int = 0, *, b: int = 1) -> None:
            seen.append((self.x, a, b))  # parameters are set first

    Both([5], {"b": 7}, x=2)
    Both(x=3)
    assert seen == [(2, 5, 7), (3, 0, 1)]
    with pytest.raises(TypeError, match="`post_init_args` of Both must be a non-mapping"):
        Both({"b": 7})

    class KeywordsOnly(ParamClass):
        def __post_init__(self, **kwargs: Any) -> None:
            seen.append(kwargs)

    KeywordsOnly({"c": 1})
    assert seen[-1] == {"c": 1}
    with pytest.raises(TypeError, match="only `post_init_kwargs` accepted"):
        KeywordsOnly({"c": 1}, {"d": 2})


def test_positional_arguments_without_post_init() -> None:
    with pytest.raises(TypeError, match=r"KNN\(\) takes parameters as keyword arguments.*none"):
        KNN(5)


@pytest.mark.parametrize(
    ("build", "error", "pattern"),
    [
        (
            lambda: KNN(k="5"),
            TypeError,
            r"Parameter `k` of KNN must be int \(got '5' of type str\)",
        ),
        (lambda: KNN(k=5.0), TypeError, r"must be int \(got 5.0 of type float\)"),
        (lambda: KNN(k=True), TypeError, r"must be int \(got True of type bool\)"),
        (
            lambda: Softmax(mode="bogus"),
            ValueError,
            r"parameter `mode` of Softmax: 'bogus' is not a valid ScoreClassifMode\. "
            r"Supported: 'diff', 'ratio', 'raw'",
        ),
        (lambda: Softmax(act_norm="2"), TypeError, r"Parameter `act_norm` of Softmax must be"),
    ],
)
def test_hyper_parameters_checked_at_construction(build: Any, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        build()


def test_hyper_parameters_checked_by_set_params() -> None:
    score = KNN(k=3)
    with pytest.raises(TypeError, match="must be int"):
        score.set_params(mode="diff", k=2.5)
    assert (score.k, score.mode) == (3, "raw")  # nothing set when a value is rejected
    with pytest.raises(ValueError, match="'bogus' is not a valid ScoreClassifMode"):
        score.mode = "bogus"
    score.set_params(k=4, mode="diff")
    assert (score.k, score.mode) == (4, "diff")
    # numpy integers and enum members are fine
    import numpy as np

    from scio.utils import ScoreClassifMode

    score.set_params(k=np.int64(2), mode=ScoreClassifMode.RATIO)
