"""Every score on Hugging Face models with dict batches (tiny models built from configs: no
download), each equal to the same score on a plain tensor-in/logits-out wrapper of the same
model recording the same submodules."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from tests.catalogue import CATALOGUE, FEAT, LOGITS, MAPS, Entry
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from scio.recorder import Recorder
from scio.scores import KNN, ODIN, Energy, GradNorm, JointInference, infer_jointly

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional extra: pip install scio[hf]"
)
from tests.hf_support import tiny_bert, tiny_vit  # noqa: E402

#: Entries run in the quick suite; every other one is marked slow (run in CI).
QUICK = {"Softmax", "ODIN", "KNN", "DeepMahalanobis", "GradNorm", "ViM", "FeatureSqueezing"}
ENTRIES = [
    pytest.param(e, id=e.name, marks=() if e.name in QUICK else pytest.mark.slow) for e in CATALOGUE
]
SEQ = (1, 3)  # the catalogue's second feature-map layer (RankFeat)
N_CALIB, N_TEST = 24, 7


class PlainViT(nn.Module):
    """The same ViT behind a tensor-in, logits-out interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def _plain(wrapper: nn.Module, example: Tensor) -> Recorder:
    return Recorder(wrapper.eval(), input_data=example, force_static_flow=False)


class PlainBert(nn.Module):
    """The same BERT taking one ``(n, 2, T)`` tensor: token ids and attention mask."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


VIT_LAYERS = {
    MAPS: "vit.layers.0.layernorm_after",
    SEQ: "vit.layers.1.mlp",
    FEAT: "vit.layernorm",
    LOGITS: "classifier",
}
BERT_LAYERS = {
    MAPS: "bert.encoder.layer.0.output",
    SEQ: "bert.encoder.layer.1.output",
    FEAT: "bert.pooler",
    LOGITS: "classifier",
}


def _record(rnet: Recorder, entry: Entry, names: dict[Any, str], prefix: str = "") -> Recorder:
    layers = [prefix + names[layer] for layer in entry.layers]
    # RankFeat reads whole token sequences (one matrix per sample); the others one vector
    rnet.record(*layers, token=None if entry.name == "RankFeat" else "cls")
    return rnet


def _images(n: int, seed: int) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _texts(n: int, seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, 8), generator=generator)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[::3, 5:] = 0  # some padded sequences
    return {"input_ids": ids, "attention_mask": mask}


def _quiet_fit(score: Any, *args: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny random models: empty classes, singular covs
        return score.fit(*args)


def _assert_same(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], name: str) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return tiny_vit()


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return tiny_bert()


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_score_on_a_vit_with_dict_inputs_equals_the_plain_wrapper(
    entry: Entry, vit: nn.Module
) -> None:
    calib, test = _images(N_CALIB, 1), _images(N_TEST, 2)
    with torch.no_grad():
        labels = vit(pixel_values=calib).logits.argmax(1)
    y = labels if entry.uses_labels else None
    rnet = _record(Recorder(vit, input_data={"pixel_values": calib[:1]}), entry, VIT_LAYERS)
    plain = _plain(PlainViT(vit), calib[:1])
    _record(plain, entry, VIT_LAYERS, prefix="model.")
    ours = _quiet_fit(entry.make(), rnet, {"pixel_values": calib}, y)
    theirs = _quiet_fit(entry.make(), plain, calib, y)
    expected = theirs(test)
    _assert_same(ours({"pixel_values": test}), expected, entry.name)
    _assert_same(ours(test), expected, entry.name)  # the bare tensor goes under its key
    torch.testing.assert_close(
        ours.confidence({"pixel_values": test}), theirs.confidence(test), rtol=1e-4, atol=1e-5
    )


def _refuses_dicts(entry: Entry) -> bool:
    """Scores that act in input space (or need per-sample gradients of a non-linear
    layer, GradNorm on feature maps) cannot take a dict batch of several tensors."""
    return entry.make()._acts_on_inputs or entry.name == "GradNorm-conv"


def _bert_loaders(bert: nn.Module) -> tuple[DataLoader, DataLoader, dict[str, Tensor], Tensor]:
    calib = _texts(N_CALIB, 3)
    with torch.no_grad():
        labels = bert(**calib).logits.argmax(1)
    rows = [
        {"input_ids": calib["input_ids"][i], "attention_mask": calib["attention_mask"][i]}
        | {"labels": labels[i]}
        for i in range(N_CALIB)
    ]
    loader = DataLoader(rows, batch_size=10)  # dict batches, labels under "labels"
    stacked = torch.stack([calib["input_ids"], calib["attention_mask"]], dim=1)
    plain_loader = DataLoader(TensorDataset(stacked, labels), batch_size=10)
    test = _texts(N_TEST, 4)
    return loader, plain_loader, test, torch.stack([test["input_ids"], test["attention_mask"]], 1)


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_score_on_bert_with_dict_batches_from_a_dataloader(
    entry: Entry, bert: nn.Module
) -> None:
    loader, plain_loader, test, plain_test = _bert_loaders(bert)
    example = {k: v[:1] for k, v in test.items()}
    rnet = _record(Recorder(bert, input_data=example), entry, BERT_LAYERS)
    score = entry.make()
    if _refuses_dicts(entry):
        with pytest.raises(TypeError, match=r"dict batch with keys \['input_ids', 'attention_m"):
            _quiet_fit(score, rnet, loader)
            score(test)  # a score with nothing to fit refuses at inference
        return
    plain = _plain(PlainBert(bert), plain_test[:1])
    _record(plain, entry, BERT_LAYERS, prefix="model.")
    ours = _quiet_fit(score, rnet, loader)
    theirs = _quiet_fit(entry.make(), plain, plain_loader)
    _assert_same(ours(test), theirs(plain_test), entry.name)


def test_joint_inference_on_dict_batches_equals_alone(bert: nn.Module, vit: nn.Module) -> None:
    loader, _, test, _ = _bert_loaders(bert)
    example = {k: v[:1] for k, v in test.items()}
    fitted = []
    for score, layers in (
        (Energy(), ()),
        (KNN(k=3), ("bert.pooler",)),
        (GradNorm(), ("classifier",)),
    ):
        rnet = Recorder(bert, input_data=example)
        rnet.record(*layers)
        fitted.append(_quiet_fit(score, rnet, loader))
    alone = [score(test) for score in fitted]
    for joint in (JointInference(fitted)(test), infer_jointly(fitted, test, batch_size=3)):
        for (out_a, conf_a), (out_j, conf_j) in zip(alone, joint, strict=True):
            torch.testing.assert_close(out_j, out_a)
            torch.testing.assert_close(conf_j, conf_a)
    calib = _images(N_CALIB, 1)
    rnet = Recorder(vit, input_data={"pixel_values": calib[:1]})
    odin = _quiet_fit(ODIN(temperature=10.0), rnet, {"pixel_values": calib})
    test_images = _images(N_TEST, 2)
    (_, conf), *_ = JointInference([odin])({"pixel_values": test_images})
    torch.testing.assert_close(conf, odin(test_images)[1])


def test_dict_batch_errors_name_the_key(bert: nn.Module) -> None:
    loader, _, test, _ = _bert_loaders(bert)
    rnet = Recorder(bert, input_data={k: v[:1] for k, v in test.items()})
    rnet.record("bert.pooler")
    knn = _quiet_fit(KNN(k=3), rnet, loader)
    with pytest.raises(ValueError, match=r"`inputs` lacks the key\(s\) \['attention_mask'\]"):
        knn({"input_ids": test["input_ids"]})
    short = {"input_ids": test["input_ids"], "attention_mask": test["attention_mask"][:3]}
    with pytest.raises(ValueError, match=r"`inputs\['attention_mask'\]` has 3 samples but"):
        knn(short)
    with pytest.raises(ValueError, match=r"`calib_data\['attention_mask'\]` has 3 samples"):
        KNN(k=3).fit(rnet, short)
    with pytest.raises(ValueError, match="`calib_labels` must be None when `calib_data` carries"):
        KNN(k=3).fit(rnet, test | {"labels": torch.zeros(N_TEST)}, torch.zeros(N_TEST))
    before = {k: v.clone() for k, v in test.items()}
    knn(test)
    assert all(torch.equal(test[k], before[k]) for k in test)  # the batch is left untouched


def test_nonfinite_rows_of_a_dict_batch_get_nan(vit: nn.Module, bert: nn.Module) -> None:
    calib = _images(N_CALIB, 1)
    rnet = Recorder(vit, input_data={"pixel_values": calib[:1]})
    rnet.record("vit.layernorm", token="cls")
    knn = _quiet_fit(KNN(k=3), rnet, {"pixel_values": calib})
    test = _images(N_TEST, 2)
    bad = test.clone()
    bad[2, 0, 0, 0] = float("nan")
    _, conf = knn({"pixel_values": bad})
    assert conf[2].isnan().all() and not conf[[0, 1, 3, 4, 5, 6]].isnan().any()
    torch.testing.assert_close(conf[[0, 1]], knn(test[[0, 1]])[1])
    # integer token ids hold no NaN: a text batch is scored whole
    loader, _, texts, _ = _bert_loaders(bert)
    rnet_text = Recorder(bert, input_data={k: v[:1] for k, v in texts.items()})
    energy = _quiet_fit(Energy(), rnet_text, loader)
    assert not energy(texts)[1].isnan().any()
