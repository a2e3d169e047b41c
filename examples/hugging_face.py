"""Confidence scores for Hugging Face models: a text classifier and a vision transformer.

    python examples/hugging_face.py                  # tiny models built from configs (offline)
    python examples/hugging_face.py --pretrained     # the two checkpoints below (downloads)

Needs ``pip install "scio[hf]"``. The models are used as they are: dict batches in,
``ModelOutput`` out, layers named as ``model.named_modules()`` prints them.
"""

from __future__ import annotations

import argparse

import torch
import transformers
from torch.utils.data import DataLoader

from scio.recorder import Recorder
from scio.scores import KNN, ODIN, Energy, JointInference

TEXT_CHECKPOINT = "distilbert-base-uncased-finetuned-sst-2-english"
VISION_CHECKPOINT = "google/vit-base-patch16-224"


def text_model(pretrained: bool) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """A sequence classifier and a few tokenised batches (labels under ``"labels"``)."""
    if pretrained:
        name = TEXT_CHECKPOINT
        model = transformers.AutoModelForSequenceClassification.from_pretrained(name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        texts = ["a delight from start to finish", "dull, long and pointless"] * 8
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
    else:
        torch.manual_seed(0)
        config = transformers.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=2
        )
        model = transformers.DistilBertForSequenceClassification(config)
        ids = torch.randint(1, 100, (16, 12))
        mask = torch.ones_like(ids)
        mask[::2, 9:] = 0  # padded sequences
    model.eval()
    labels = torch.arange(len(ids)) % 2
    batches = [
        {
            "input_ids": ids[i : i + 8],
            "attention_mask": mask[i : i + 8],
            "labels": labels[i : i + 8],
        }
        for i in range(0, len(ids), 8)
    ]
    return model, batches


def vision_model(pretrained: bool) -> tuple[torch.nn.Module, int]:
    """An image classifier and its input size."""
    if pretrained:
        model = transformers.ViTForImageClassification.from_pretrained(VISION_CHECKPOINT)
        return model.eval(), 224
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    return transformers.ViTForImageClassification(config).eval(), 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", action="store_true", help="download the checkpoints")
    args = parser.parse_args()

    # -- a text classifier: dict batches from a DataLoader, labels under "labels" ---------
    model, batches = text_model(args.pretrained)
    loader = DataLoader(batches, batch_size=None)  # already batched
    example = {k: v[:1] for k, v in batches[0].items() if k != "labels"}
    rnet = Recorder(model, input_data=example)  # called as model(**batch)
    rnet.record("pre_classifier", token=None)  # DistilBERT's pooled [CLS] features
    knn = KNN(k=3).fit(rnet, loader)
    energy = Energy().fit(Recorder(model, input_data=example), loader)
    test = {k: v for k, v in batches[-1].items() if k != "labels"}
    (logits, conf_knn), (_, conf_energy) = JointInference([knn, energy])(test)
    print("text  logits", tuple(logits.shape), "KNN", conf_knn[:4, 0].tolist())
    print("text  Energy", conf_energy[:4, 0].tolist())

    # -- a vision transformer: {"pixel_values": x} or the bare tensor ---------------------
    vit, size = vision_model(args.pretrained)
    images = torch.rand(24, 3, size, size)
    rnet = Recorder(vit, input_data={"pixel_values": images[:1]})
    rnet.record("vit.layernorm", token="cls")  # the classifier's input: the CLS token
    knn = KNN(k=5).fit(rnet, {"pixel_values": images[:16]})
    odin = ODIN(temperature=1000.0, epsilon=0.0014).fit(rnet, images[:16])  # input gradients
    with torch.inference_mode():  # a service's setting: the gradient score handles it
        _, conf_odin = odin({"pixel_values": images[16:]})
    _, conf_knn = knn(images[16:])  # a bare tensor goes in as pixel_values
    print("image KNN", conf_knn[:4, 0].tolist())
    print("image ODIN", conf_odin[:4, 0].tolist())


if __name__ == "__main__":
    main()
