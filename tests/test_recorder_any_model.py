"""The Recorder on any model: dict batches, structured outputs, layers by name, token
reductions and compiled networks (tiny Hugging Face models built from configs: no
download)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from scio.recorder import Recorder
from scio.recorder.head import find_head
from scio.recorder.io import batch_size, read_output, reduce_tokens, split_labels
from tests.conftest import make_net

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional extra: pip install scio[hf]"
)
from tests.hf_support import tiny_bert, tiny_vit  # noqa: E402


def text_batch(n: int = 5, seed: int = 1) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[0, 5:] = 0  # one padded sequence
    return {"input_ids": torch.randint(0, 50, (n, 8), generator=generator), "attention_mask": mask}


class Plain(nn.Module):
    """Tensor in, logits out: the same model behind a plain interface."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        kwargs = {self.key: x} if mask is None else {self.key: x, "attention_mask": mask}
        return self.model(**kwargs).logits


def test_bert_dict_batch_equals_plain_wrapper() -> None:
    bert = tiny_bert()
    batch = text_batch()
    rnet = Recorder(bert, input_data=batch)
    rnet.record("bert.pooler")
    out = rnet(batch)
    assert isinstance(out, Tensor)
    torch.testing.assert_close(out, bert(**batch).logits, rtol=0, atol=0)
    plain = Recorder(
        Plain(bert, "input_ids"), input_data=batch["input_ids"][:1], force_static_flow=False
    )
    plain.record("model.bert.pooler")
    plain(batch["input_ids"], batch["attention_mask"])
    (ours,) = rnet.activations.values()
    (theirs,) = plain.activations.values()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert "bert.pooler" in rnet.layer_names.values()
    assert "bert.encoder.layer.0.attention.self.query" in repr(rnet)  # names as record takes


def test_token_reductions_use_the_attention_mask() -> None:
    bert = tiny_bert()
    batch = text_batch()
    rnet = Recorder(bert, input_data=batch)
    layer = "bert.encoder.layer.1.output"
    rnet.record(layer)
    rnet(batch)
    (tokens,) = rnet.activations.values()
    assert tokens.shape == (5, 8, 16)
    rnet.record(layer, token="cls")
    rnet(batch)
    torch.testing.assert_close(next(iter(rnet.activations.values())), tokens[:, 0])
    rnet.record(layer, token="mean")
    rnet(batch)
    mean = next(iter(rnet.activations.values()))
    torch.testing.assert_close(mean[0], tokens[0, :5].mean(0))  # padding left out
    torch.testing.assert_close(mean[1:], tokens[1:].mean(1))
    with pytest.raises(ValueError, match="`token` must be None, 'cls' or 'mean'"):
        rnet.record(layer, token="max")  # type: ignore[arg-type]


def test_vit_pixel_values_and_head_discovery() -> None:
    vit = tiny_vit()
    batch = {"pixel_values": torch.randn(4, 1, 8, 8)}
    rnet = Recorder(vit, input_data=batch)
    rnet.record("vit.layernorm", token="cls")
    torch.testing.assert_close(rnet(batch), vit(**batch).logits, rtol=0, atol=0)
    (features,) = rnet.activations.values()
    assert features.shape == (4, 16)
    name, head = find_head(rnet, batch)
    assert name == "classifier" and head is vit.classifier
    torch.testing.assert_close(head(features), rnet(batch), rtol=0, atol=0)


class _Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.kind = kind

    def forward(self, x: Tensor) -> Any:
        z = self.fc(x)
        if self.kind == "tuple":
            return z, z.sum()
        if self.kind == "dict":
            return {"logits": z, "aux": z * 2}
        return {"scores": z}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_structured_outputs_are_read_as_logits(kind: str) -> None:
    net = _Structured(kind).eval()
    x = torch.randn(6, 4)
    rnet = Recorder(net, input_data=x[:1], force_static_flow=False)
    rnet.record("fc")
    torch.testing.assert_close(rnet(x), net.fc(x))


def test_output_override_and_clear_error() -> None:
    net = _Structured("other").eval()
    x = torch.randn(6, 4)
    rnet = Recorder(net, input_data=x[:1], force_static_flow=False)
    with pytest.raises(TypeError, match="output=") as info:
        rnet(x)
    assert "['scores']" in str(info.value)
    named = Recorder(net, input_data=x[:1], force_static_flow=False, output="scores")
    torch.testing.assert_close(named(x), net.fc(x))
    called = Recorder(net, input_data=x[:1], force_static_flow=False, output=lambda o: -o["scores"])
    torch.testing.assert_close(called(x), -net.fc(x))
    with pytest.raises(TypeError, match="has no such field"):
        Recorder(net, input_data=x[:1], force_static_flow=False, output="logits")(x)
    with pytest.raises(TypeError, match="`output` must be None"):
        Recorder(net, input_data=x[:1], force_static_flow=False, output=3)  # type: ignore[arg-type]


def test_batch_helpers_name_the_key() -> None:
    batch = text_batch()
    assert batch_size(batch) == 5
    bad = {**batch, "attention_mask": batch["attention_mask"][:3]}
    with pytest.raises(ValueError, match=r"`inputs\['attention_mask'\]` has 3 samples"):
        batch_size(bad)
    with pytest.raises(TypeError, match="at least one batched tensor"):
        batch_size({"n": 3})
    with pytest.raises(TypeError, match="a torch.Tensor or a dict of tensors"):
        batch_size([1, 2])
    inputs, labels = split_labels({**batch, "labels": torch.arange(5)})
    assert set(inputs) == {"input_ids", "attention_mask"} and labels.tolist() == [0, 1, 2, 3, 4]
    assert split_labels(batch) == (batch, None)
    assert read_output((torch.ones(2),), None).shape == (2,)
    assert reduce_tokens(torch.ones(2, 3), "cls").shape == (2, 3)  # not a token sequence


def test_compiled_network_equals_eager() -> None:
    net = make_net()
    x = torch.randn(7, 1, 4, 4)
    eager = Recorder(net, input_data=x[:1])
    eager.record((1, 2), (1, 4))
    expected = eager(x)
    acts = [a.clone() for a in eager.activations.values()]
    compiled = Recorder(torch.compile(net, backend="aot_eager"), input_data=x[:1])
    compiled.record((1, 2), (1, 4))
    torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=0)
    for got, want in zip(compiled.activations.values(), acts):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    del eager, compiled
    assert all(not m._forward_hooks for m in net.modules())


@pytest.mark.slow
def test_compile_true_compiles_once_with_the_hooks() -> None:
    """``compile=True``: inductor compiles the recorded network once, hooks included."""
    net = make_net()
    x = torch.randn(7, 1, 4, 4)
    eager = Recorder(net, input_data=x[:1])
    eager.record((1, 2), (1, 4))
    expected = eager(x)
    acts = [a.clone() for a in eager.activations.values()]
    once = Recorder(net, input_data=x[:1], compile=True)
    once.record((1, 2), (1, 4))
    for _ in range(2):  # the second call reuses the compiled graph
        torch.testing.assert_close(once(x), expected, atol=1e-5, rtol=0)
        for got, want in zip(once.activations.values(), acts):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
