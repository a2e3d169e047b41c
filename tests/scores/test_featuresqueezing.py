"""FeatureSqueezing: squeezers against scipy and naive loops, conformity against a naive loop."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from tests.conftest import DTYPES, make_net
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores.classification.featuresqueezing import (
    FeatureSqueezing,
    bits_squeeze,
    median_squeeze,
    parse_squeezers,
)

scipy_ndimage = pytest.importorskip("scipy.ndimage")


def reflect(i: int, n: int) -> int:
    """scipy's ``reflect`` border (d c b a | a b c d | d c b a), by repeated folding."""
    while not 0 <= i < n:
        i = -i - 1 if i < 0 else 2 * n - 1 - i
    return i


def naive_median(x: np.ndarray, size: int, axes: tuple[int, ...]) -> np.ndarray:
    """Plain loops over every element and every window position."""
    result = np.empty(x.shape, dtype=np.float64)
    for index in itertools.product(*(range(n) for n in x.shape)):
        values = []
        for offsets in itertools.product(
            range(-(size // 2), (size - 1) // 2 + 1), repeat=len(axes)
        ):
            position = list(index)
            for axis, offset in zip(axes, offsets):
                position[axis] = reflect(index[axis] + offset, x.shape[axis])
            values.append(float(x[tuple(position)]))
        values.sort()
        m = len(values)
        result[index] = values[m // 2] if m % 2 else (values[m // 2 - 1] + values[m // 2]) / 2
    return result


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize(
    ("shape", "axes"), [((2, 6), (1,)), ((2, 5, 3), (1, 2)), ((2, 2, 4, 5), (2, 3))]
)
def test_median_matches_scipy_and_loops(
    size: int, shape: tuple[int, ...], axes: tuple[int, ...]
) -> None:
    generator = torch.Generator().manual_seed(size)
    x = torch.randint(0, 6, shape, generator=generator).double()  # many ties
    result = median_squeeze(x, size)
    assert result.dtype == x.dtype
    assert result.shape == x.shape
    expected = naive_median(x.numpy(), size, axes)
    np.testing.assert_array_equal(result.numpy(), expected)
    if hasattr(scipy_ndimage, "vectorized_filter"):
        ref = scipy_ndimage.vectorized_filter(x.numpy(), np.median, size=size, axes=axes)
        np.testing.assert_array_equal(result.numpy(), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_median_dtypes(dtype: torch.dtype) -> None:
    x = torch.rand(3, 2, 5, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    for size in (2, 3):
        result = median_squeeze(x, size)
        assert result.dtype == dtype
        expected = naive_median(x.double().numpy(), size, (2, 3))
        assert torch.equal(result, torch.from_numpy(expected).to(dtype))


def test_bits_squeeze() -> None:
    x = torch.tensor([[0.0, 0.1, 0.26, 0.5, 0.74, 0.9, 1.0, -0.3]], dtype=torch.float64)
    for n in (1, 3, 8, 31):
        expected = [(round(v * 2**n) + 0.5) / 2**n for v in x[0].tolist()]  # half to even
        assert bits_squeeze(x, n)[0].tolist() == expected
    half = bits_squeeze(x.half(), 20)
    assert half.dtype == torch.float16
    assert half.isfinite().all()
    for bad in (0, 32, -1):
        with pytest.raises(
            ValueError, match=rf"^Bits squeezing requires 0<n_bits<32 \(got {bad}\)$"
        ):
            bits_squeeze(x, bad)


def test_median_errors() -> None:
    with pytest.raises(ValueError, match=r"^Median squeezing requires a positive size \(got 0\)$"):
        median_squeeze(torch.rand(2, 3), 0)
    with pytest.raises(ValueError, match=r"^Individual samples must be 1D, 2D or 3D \(got 4D\)$"):
        median_squeeze(torch.rand(2, 1, 3, 3, 3), 2)
    with pytest.raises(ValueError, match=r"^Individual samples must be 1D, 2D or 3D \(got 0D\)$"):
        median_squeeze(torch.rand(2), 2)


def test_parse_squeezers() -> None:
    def custom(x: Tensor) -> Tensor:
        return x

    assert parse_squeezers(custom) == (custom,)
    x = torch.rand(2, 1, 4, 4)
    (fn,) = parse_squeezers("median: 3 ")
    assert torch.equal(fn(x), median_squeeze(x, 3))
    fns = parse_squeezers(["bits:4", custom, "median:2"])
    assert len(fns) == 3
    assert torch.equal(fns[0](x), bits_squeeze(x, 4))
    assert fns[1] is custom
    assert len(parse_squeezers(s for s in ("bits:1", "bits:2"))) == 2
    for bad in ("bits", "median:", "bits:x", "Bits:3", "mean:3", " bits:3"):
        with pytest.raises(ValueError, match=f"^Squeezer {bad!r} is not supported$"):
            parse_squeezers(bad)
    with pytest.raises(TypeError, match=r"^Custom squeezers must be callable \(got 3\)$"):
        parse_squeezers(3)  # type: ignore[arg-type]  # deliberately wrong
    with pytest.raises(TypeError, match=r"^Custom squeezers must be callable \(got None\)$"):
        parse_squeezers(["bits:3", None])  # type: ignore[list-item]
    (lazy,) = parse_squeezers("bits:0")  # the integer is validated when applied
    with pytest.raises(ValueError, match="Bits squeezing requires"):
        lazy(x)


def naive_conformity(
    net: torch.nn.Module, x: Tensor, squeezed: list[Tensor], p: float, aggregation: str | float
) -> Tensor:
    def probs(inputs: Tensor) -> list[list[float]]:
        with torch.no_grad():
            rows = net(inputs).double().tolist()
        result = []
        for row in rows:
            exps = [math.exp(v - max(row)) for v in row]
            result.append([e / sum(exps) for e in exps])
        return result

    base = probs(x)
    dists = []
    for s in squeezed:
        rows = []
        for ref, other in zip(base, probs(s)):
            diffs = [abs(a - b) for a, b in zip(ref, other)]
            rows.append(max(diffs) if p == math.inf else sum(d**p for d in diffs) ** (1 / p))
        dists.append(rows)
    per_sample = list(zip(*dists))
    if aggregation == "max":
        values = [max(row) for row in per_sample]
    elif aggregation == "mean":
        values = [sum(row) / len(row) for row in per_sample]
    else:
        order = float(aggregation)
        values = [sum(v**order for v in row) ** (1 / order) for row in per_sample]
    return -torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("squeezers", "p", "aggregation"),
    [
        ("bits:2", 1.0, "max"),
        (["bits:3", "median:2"], 1.0, "max"),
        (["median:3", "bits:5", "custom"], 2.0, "mean"),
        (("bits:1", "median:4"), math.inf, 2.0),
    ],
)
def test_conformity_matches_naive(
    dtype: torch.dtype,
    squeezers: str | list[str] | tuple[str, ...],
    p: float,
    aggregation: str | float,
) -> None:
    def custom(x: Tensor) -> Tensor:
        return x.flip(-1)

    generator = torch.Generator().manual_seed(8)
    net = make_net(dtype=dtype, seed=6)
    x = torch.rand(7, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record((1, 3))
    names = [squeezers] if isinstance(squeezers, str) else list(squeezers)
    spec = (
        squeezers if isinstance(squeezers, str) else [custom if s == "custom" else s for s in names]
    )
    score = FeatureSqueezing(squeezers=spec, dist_norm=p, aggregation=aggregation)
    score.fit(rnet, x, ...)
    out, conformity = score(x)
    with torch.no_grad():
        assert torch.equal(out, net(x))
    assert conformity.shape == (7, 3)
    assert conformity.dtype == dtype
    squeezed = []
    for name in names:
        if name == "custom":
            squeezed.append(custom(x))
        elif name.startswith("bits:"):
            n = int(name[5:])
            squeezed.append(((torch.round(x.double() * 2**n) + 0.5) / 2**n).to(dtype))
        else:
            size = int(name[7:])
            median = naive_median(x.double().numpy(), size, (2, 3))
            squeezed.append(torch.from_numpy(median).to(dtype))
    expected = naive_conformity(net, x, squeezed, p, aggregation)
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(conformity[:, 0].double(), expected, atol=tol, rtol=tol)
    assert torch.equal(conformity[:, 0], conformity[:, 1])


def test_fit_checks_inputs_untouched_and_dataloader() -> None:
    net = make_net()
    x = torch.rand(20, 1, 4, 4)
    saved = x.clone()
    rnet = Recorder(net, input_data=x[[0]])
    ref = FeatureSqueezing(squeezers=["bits:4", "median:2"]).fit(rnet, x)
    loader = DataLoader(TensorDataset(x, torch.zeros(20)), batch_size=7)
    streamed = FeatureSqueezing(squeezers=["bits:4", "median:2"]).fit(rnet, loader)
    _, conformity = ref(x)
    assert torch.equal(conformity, streamed(x)[1])
    assert torch.equal(x, saved)
    assert not x.requires_grad
    assert not conformity.requires_grad
    assert len(ref.squeezers_fn) == 2
    ref.squeezers = "bits:2"  # the parsed squeezers follow the parameter
    assert not ref.is_fit
    assert len(ref.squeezers_fn) == 1
    with pytest.raises(RuntimeError, match=r"Missing parameters for FeatureSqueezing score"):
        FeatureSqueezing().fit(rnet, x)
    with pytest.raises(AssertionError):
        FeatureSqueezing(squeezers=[]).fit(rnet, x)
    with pytest.raises(ValueError, match="^Squeezer 'blur:3' is not supported$"):
        FeatureSqueezing(squeezers="blur:3").fit(rnet, x)
    unfit = FeatureSqueezing(squeezers=1.5)  # as the reference: checked at fit, not before
    with pytest.raises(TypeError, match=r"^Custom squeezers must be callable \(got 1.5\)$"):
        unfit.fit(rnet, x)
    with pytest.raises(TypeError, match=r"^Custom squeezers must be callable \(got 1.5\)$"):
        FeatureSqueezing(squeezers=[1.5]).fit(rnet, x)
    with pytest.raises(ValueError, match="is not a valid AggrName"):
        FeatureSqueezing(squeezers="bits:3", aggregation="median").fit(rnet, x)
    score = FeatureSqueezing(squeezers="bits:40").fit(rnet, x)  # validated when applied
    with pytest.raises(ValueError, match=r"Bits squeezing requires 0<n_bits<32 \(got 40\)"):
        score(x)
    assert repr(FeatureSqueezing(squeezers="bits:3")) == (
        "FeatureSqueezing[unfit](act_norm=None, mode='raw', squeezers='bits:3', dist_norm=1.0, "
        "aggregation='max')"
    )


def test_median_squeezer_checks_the_sample_rank_first() -> None:
    """As the reference, the squeezer's own check comes first, even when the network output
    has no class axis (0-D samples through ``nn.Identity``)."""
    rnet = Recorder(torch.nn.Identity(), input_size=(1,))
    score = FeatureSqueezing(squeezers="median:1").fit(rnet, [], None)
    with pytest.raises(ValueError, match=r"^Individual samples must be 1D, 2D or 3D \(got 0D\)$"):
        score(torch.rand(1))
