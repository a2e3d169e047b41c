"""Tiny Hugging Face models built from configs (random weights, no download) for the tests.
Import only after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

import torch
import transformers
from torch import nn


def tiny_bert(seed: int = 0) -> nn.Module:
    """A 2-layer BERT sequence classifier: vocabulary 50, width 16, 3 classes."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def tiny_vit(seed: int = 0) -> nn.Module:
    """A 2-layer ViT image classifier: 1×8×8 images, 4×4 patches, width 16, 3 classes."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config).eval()
