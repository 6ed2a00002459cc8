"""Modules the tests name by import path (`model.module.path: user_models:...`); `tests/` is
on sys.path in every test session (tests/conftest.py)."""

from __future__ import annotations

from torch import nn


def tiny_bert_config(num_labels: int = 3):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


class TinyBertClassifier(nn.Module):
    """A transformers BertForSequenceClassification (random weights, built from a config, no
    download) behind the recipe's float features: each feature column is one token id."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        from transformers import BertForSequenceClassification

        self.model = BertForSequenceClassification(tiny_bert_config(out_features))

    def forward(self, x):
        return self.model(input_ids=x.long()).logits


class TwoTower(nn.Module):
    """A model whose forward is no chain of its children (the summary cannot run it layer by
    layer): a backbone with batch norm, and a head."""

    def __init__(self, input_shape: tuple[int, ...], out_features: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(input_shape[0], 8), nn.BatchNorm1d(8), nn.ReLU())
        self.skip = nn.Linear(input_shape[0], 8)
        self.head = nn.Linear(8, out_features)

    def forward(self, x):
        return self.head(self.backbone(x) + self.skip(x))
