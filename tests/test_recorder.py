"""Recorder: layer table, selection, recording, post-processing, hooks life cycle."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torchinfo.layer_info import LayerInfo

from scio.recorder import Recorder, capture, get_layer_info_depth_idx, lazy_func
from tests.conftest import TinyConvNet, make_net

ALL_LAYERS = [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]


def _manual_activations(net: TinyConvNet, x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    conv = net.conv(x)
    soft = net.softplus(conv)
    pool = net.pool(soft)
    flat = net.flatten(pool)
    fc = net.fc(flat)
    return {(1, 1): conv, (1, 2): soft, (1, 3): pool, (1, 4): flat, (1, 5): fc, (0, 1): fc}


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def rnet(net: TinyConvNet, x: torch.Tensor) -> Recorder:
    return Recorder(net, input_data=x[[0]])


def test_repr_header_table_and_footer(rnet: Recorder) -> None:
    text = repr(rnet)
    lines = text.split("\n")
    assert lines[0] == "Recorder instance for the following network"
    assert lines[1].startswith("=") and set(lines[1]) == {"="}
    assert "Layer (type (var_name):depth-idx)" in text
    assert "├─Conv2d (conv): 1-1" in text
    assert "├─Softplus (softplus): 1-2" in text
    assert "├─Linear (fc): 1-5" in text
    assert lines[-2] == "Currently recording: None"
    assert lines[-1] == lines[1]
    rnet.record((1, 5), (1, 1))
    assert repr(rnet).split("\n")[-2] == "Currently recording: 1-1, 1-5"


def test_custom_torchinfo_columns(net: TinyConvNet, x: torch.Tensor) -> None:
    rnet = Recorder(net, input_data=x[[0]], col_names=["output_size"])
    text = repr(rnet)
    assert "Output Shape" in text and "Input Shape" not in text


def test_requires_input_data_or_size(net: TinyConvNet) -> None:
    with pytest.raises(ValueError, match="You must provide `input_data` or `input_size`"):
        Recorder(net)
    rnet = Recorder(net, input_size=(1, 1, 4, 4), device="cpu")
    assert rnet.layers == ((0, 1), *ALL_LAYERS)


def test_rejects_non_module() -> None:
    with pytest.raises(TypeError, match="`net` must be a torch.nn.Module"):
        Recorder(lambda x: x, input_size=(1, 2))  # type: ignore[arg-type]


def test_record_errors_and_hint(rnet: Recorder) -> None:
    rnet.record((1, 2))
    with pytest.raises(
        ValueError,
        match=r"^Following layers not found: \{1, 3\}\. Did you mean `rnet\.record\(\(1, 3\)\)`\? "
        r"Operation cancelled$",
    ):
        rnet.record(1, 3)
    with pytest.raises(ValueError, match=r"^Following layers not found: \{\(9, 9\)\}\. Operation"):
        rnet.record((1, 1), (9, 9))
    assert rnet.recording == ((1, 2),)  # previous selection kept
    rnet.record()
    assert rnet.recording == ()


def test_recording_sorted_and_deduplicated(rnet: Recorder) -> None:
    rnet.record((1, 5), (0, 1), (1, 2), (1, 5))
    assert rnet.recording == ((0, 1), (1, 2), (1, 5))


def test_record_by_module_name(rnet: Recorder) -> None:
    rnet.record("pool", (1, 5))
    assert rnet.recording == ((1, 3), (1, 5))
    assert rnet.layer_names[(1, 3)] == "pool"
    assert rnet.layer_names[(0, 1)] == ""
    with pytest.raises(ValueError, match="Following layers not found: {'nope'}"):
        rnet.record("nope")


@pytest.mark.parametrize("n_layers", [0, 1, 2, 3, 6])
def test_activations_values_and_firing_order(
    rnet: Recorder, net: TinyConvNet, x: torch.Tensor, n_layers: int
) -> None:
    layers = [(0, 1), *ALL_LAYERS][:n_layers][::-1]
    rnet.record(*layers)
    out = rnet(x)
    expected = _manual_activations(net, x)
    torch.testing.assert_close(out, expected[(0, 1)])
    firing = [layer for layer in [*ALL_LAYERS, (0, 1)] if layer in layers]
    assert list(rnet.activations) == firing
    for layer in layers:
        torch.testing.assert_close(rnet.activations[layer], expected[layer])
    with pytest.raises(TypeError):
        rnet.activations[(1, 1)] = out  # type: ignore[index]


def test_whole_network_is_the_output(rnet: Recorder, x: torch.Tensor) -> None:
    rnet.record((0, 1))
    out = rnet(x)
    assert rnet.activations[(0, 1)] is out


def test_dont_record(rnet: Recorder, net: TinyConvNet, x: torch.Tensor) -> None:
    rnet.record((1, 1))
    out = rnet(x, dont_record=True)
    assert dict(rnet.activations) == {}
    torch.testing.assert_close(out, net(x))


def test_direct_net_calls_record_nothing(rnet: Recorder, net: TinyConvNet, x: torch.Tensor) -> None:
    rnet.record((1, 1))
    rnet(x)
    before = dict(rnet.activations)
    net(x)
    assert dict(rnet.activations).keys() == before.keys()
    assert rnet.activations[(1, 1)] is before[(1, 1)]


def test_single_postprocessor(rnet: Recorder, net: TinyConvNet, x: torch.Tensor) -> None:
    rnet.record((1, 2), (1, 4))
    out = rnet(x, activation_postproc=lambda t: t * 0)
    assert torch.equal(out, net.fc.bias.expand_as(out))
    # post-processing also applies with dont_record=True
    out2 = rnet(x, activation_postproc=lambda t: t * 0, dont_record=True)
    torch.testing.assert_close(out2, out)


def test_postprocessor_none_keeps_output_and_inplace_edits_recorded(
    rnet: Recorder, net: TinyConvNet, x: torch.Tensor
) -> None:
    rnet.record((1, 1))
    out = rnet(x, activation_postproc=lambda t: None)
    torch.testing.assert_close(out, net(x))

    def inplace(t: torch.Tensor) -> None:
        t.zero_()

    rnet(x, activation_postproc=inplace)
    assert torch.count_nonzero(rnet.activations[(1, 1)]) == 0


def test_postprocessor_list_order(rnet: Recorder, x: torch.Tensor) -> None:
    rnet.record((1, 4), (1, 1))
    seen: list[str] = []

    def tag(name: str):  # type: ignore[no-untyped-def]
        def func(t: torch.Tensor) -> None:
            seen.append(f"{name}:{tuple(t.shape)}")

        return func

    rnet(x, activation_postproc=[tag("a"), tag("b"), tag("extra")])
    assert seen == ["a:(6, 2, 4, 4)", "b:(6, 8)"]
    with pytest.raises(ValueError, match=r"There were not enough postprocessing functions .*\(2\)"):
        rnet(x, activation_postproc=[tag("only")])
    assert dict(rnet.activations) == {}
    with pytest.raises(TypeError, match="activation_postproc"):
        rnet(x, activation_postproc=3)  # type: ignore[arg-type]


def test_exception_in_net_leaves_no_state(x: torch.Tensor) -> None:
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.flatten(1))

    net = Failing()
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record((1, 1))
    rnet(x)
    with pytest.raises(RuntimeError):
        rnet(torch.rand(2, 3))  # shape error inside the net
    assert dict(rnet.activations) == {}
    assert capture.active(rnet._owner) is None  # no call left running in this context
    rnet(x)  # still usable
    assert list(rnet.activations) == [(1, 1)]


def test_missing_activation_with_dynamic_flow(x: torch.Tensor) -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x.flatten(1))
            if h.sum() > 1e9:
                return h
            return self.b(h)

    net = Dynamic()
    with pytest.raises(
        RuntimeError, match="control flow of the input network is not static"
    ) as info:
        Recorder(net, input_data=x[[0]])
    assert isinstance(info.value.__cause__, torch.fx.proxy.TraceError)
    rnet = Recorder(net, input_data=x[[0]], force_static_flow=False)
    rnet.record((1, 2))
    rnet(x)
    with torch.no_grad():
        net.a.bias.fill_(1e12)
    with pytest.raises(RuntimeError, match=r"^Missing \[\(1, 2\)\] activations\. This may be due"):
        rnet(x)
    assert dict(rnet.activations) == {}


def test_two_recorders_on_one_net(net: TinyConvNet, x: torch.Tensor) -> None:
    r1 = Recorder(net, input_data=x[[0]])
    r2 = Recorder(net, input_data=x[[0]])
    r1.record((1, 1))
    r2.record((1, 5))
    r1(x)
    assert list(r1.activations) == [(1, 1)]
    r2(x)
    assert list(r2.activations) == [(1, 5)]
    assert list(r1.activations) == [(1, 1)]
    # each recorder hooks only the modules it records
    assert len(net.conv._forward_hooks) == 1 and len(net.fc._forward_hooks) == 1
    assert len(net._forward_hooks) == 0 and len(net.pool._forward_hooks) == 0
    r1.record((0, 1), (1, 5))
    assert len(net._forward_hooks) == 1 and len(net.fc._forward_hooks) == 2
    assert len(net.conv._forward_hooks) == 0


def test_recorded_modules_and_params(rnet: Recorder, net: TinyConvNet) -> None:
    rnet.record((1, 5), (1, 2), (1, 1))
    assert rnet.recorded_modules == {(1, 1): net.conv, (1, 2): net.softplus, (1, 5): net.fc}
    assert list(rnet.recorded_params) == [
        "_net.conv.weight",
        "_net.conv.bias",
        "_net.fc.weight",
        "_net.fc.bias",
    ]
    assert rnet.recorded_params["_net.fc.weight"] is net.fc.weight
    rnet.record((0, 1))
    assert len(rnet.recorded_params) == len(list(net.parameters()))
    assert rnet.net is net
    assert dict(rnet.named_parameters()).keys() == rnet.recorded_params.keys()


def test_gradients_flow_and_kwargs(x: torch.Tensor) -> None:
    class WithKwarg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.lin(x.flatten(1)) * scale

    net = WithKwarg()
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record((1, 1))
    inputs = x.clone().requires_grad_()
    out = rnet(inputs, scale=2.0)
    torch.testing.assert_close(out, net(x) * 2)
    out.sum().backward()
    assert inputs.grad is not None and net.lin.weight.grad is not None
    assert rnet.activations[(1, 1)].requires_grad


def test_hooks_removed_when_recorder_is_deleted(net: TinyConvNet, x: torch.Tensor) -> None:
    flags = {name: p.requires_grad for name, p in net.named_parameters()}
    net.conv.weight.requires_grad_(False)
    net.train()
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record((1, 1))
    rnet(x)
    assert net.training and not net.conv.weight.requires_grad  # untouched by the recorder
    assert [len(m._forward_hooks) for m in net.modules()] == [
        int(m is net.conv) for m in net.modules()
    ]  # only the recorded module is hooked
    ref = weakref.ref(rnet)
    del rnet
    gc.collect()
    assert ref() is None
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    net.conv.weight.requires_grad_(flags["conv.weight"])
    net(x)  # usable


def test_remove_hooks(rnet: Recorder, net: TinyConvNet) -> None:
    rnet.remove_hooks()
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


def test_layer_called_twice_gets_two_ids(x: torch.Tensor) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(F.relu(self.lin(x.flatten(1))))

    net = Twice()
    rnet = Recorder(net, input_data=x[[0]])
    assert rnet.layers == ((0, 1), (1, 1), (1, 2))
    rnet.record((1, 2))
    out = rnet(x)
    assert rnet.activations[(1, 2)] is out


def test_tuple_outputs_are_recorded(x: torch.Tensor) -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x * 2

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.pair(x)
            return a + b

    rnet = Recorder(Net(), input_data=x[[0]])
    rnet.record((1, 1))
    rnet(x)
    recorded = rnet.activations[(1, 1)]
    assert isinstance(recorded, tuple) and len(recorded) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_dtypes_are_kept(dtype: torch.dtype) -> None:
    net = make_net(dtype=dtype)
    x = torch.rand(3, 1, 4, 4, dtype=dtype)
    rnet = Recorder(net, input_data=x[[0]])
    rnet.record((1, 3))
    rnet(x)
    assert rnet.activations[(1, 3)].dtype == dtype


def test_lazy_func_and_layer_info_helpers() -> None:
    class Obj:
        def method(self, value: int) -> int:
            return value + 1

    obj = Obj()
    func = lazy_func(weakref.WeakMethod(obj.method))
    assert func(1) == 2
    del obj
    gc.collect()
    assert func(1) is None
    info = LayerInfo("x", nn.Linear(2, 2), depth=1)
    assert info.depth_index is None
    with pytest.raises(ValueError, match="Unexpected `None` depth_index for"):
        get_layer_info_depth_idx(info)
    info.depth_index = 4
    assert get_layer_info_depth_idx(info) == (1, 4)


def test_wrong_example_input_shape_says_what_to_do() -> None:
    with pytest.raises(
        RuntimeError, match=r"failed to run on the Recorder's example input \(\(1, 5\)\)"
    ):
        Recorder(nn.Linear(4, 3), input_size=(1, 5))
    with pytest.raises(RuntimeError, match=r"example input \(\(2, 7\)\).*`input_data`"):
        Recorder(nn.Linear(4, 3), input_data=torch.zeros(2, 7))
