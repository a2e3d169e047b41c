"""Every algorithm x a grid of its parameters x float16/32/64 on a small conv net.

Calibration has 3 classes with one absent. Checks: output equals the plain network output,
conformity has shape (n, C), lies on the input's device, has no NaN, and fitting from a
DataLoader (batch size 7) gives the same conformity as fitting from one tensor.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from tests.catalogue import CATALOGUE, Entry
from tests.conftest import DTYPES, make_net
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder


def _cases() -> list[Any]:
    cases = []
    for entry in CATALOGUE:
        keys = list(entry.grid)
        for values in itertools.product(*(entry.grid[key] for key in keys)) or [()]:
            params = dict(zip(keys, values, strict=True))
            label = ",".join(f"{k}={v}" for k, v in params.items())
            for dtype in DTYPES:
                cases.append(
                    pytest.param(
                        entry,
                        params,
                        dtype,
                        id=f"{entry.name}[{label}]-{dtype}".replace("torch.", ""),
                    )
                )
    return cases


TOL = {torch.float16: 5e-3, torch.float32: 1e-5, torch.float64: 1e-9}


@pytest.mark.parametrize(("entry", "params", "dtype"), _cases())
def test_functional_grid(entry: Entry, params: dict[str, Any], dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    net = make_net(dtype=dtype)
    calib = torch.rand(40, 1, 4, 4, generator=generator).to(dtype)
    labels = torch.randint(0, 2, (40,), generator=generator)  # class 2 absent
    test = torch.rand(8, 1, 4, 4, generator=generator).to(dtype)
    rnet = Recorder(net, input_data=calib[[0]])
    rnet.record(*entry.layers)

    score = entry.make(**params).fit(rnet, calib, labels)
    out, conformity = score(test)
    with torch.no_grad():
        expected = net(test)
    torch.testing.assert_close(out.detach(), expected)
    assert conformity.shape == (8, 3)
    assert conformity.device == test.device
    assert not torch.isnan(conformity).any(), conformity

    loader = DataLoader(TensorDataset(calib, labels), batch_size=7)
    streamed = entry.make(**params).fit(rnet, loader)
    _, conformity2 = streamed(test)
    tol = TOL[dtype]
    torch.testing.assert_close(conformity2, conformity, atol=tol, rtol=tol)
