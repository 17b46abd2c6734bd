"""Shared fixtures: tiny BERTs and a tiny WordPiece tokenizer, built in-process (offline, CPU)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


def load_script(path: Path, name: str):
    """Import a script (``benchmarks/``, ``tools/arm/``: folders of scripts, not packages) as module ``name``,
    registered in ``sys.modules`` (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


WORDS = (
    "the a an film movie story plot actor actress scene is was are be good great bad awful "
    "boring funny dull brilliant moving fun mess not very really and but with of to it this "
    "that love hate best worst ever i you we they characters script ending beautiful stupid"
).split()

TINY_TEXTS = [
    ("a brilliant and moving film", 1),
    ("the worst movie ever", 0),
    ("funny , beautiful and fun", 1),
    ("a boring , dull mess", 0),
    ("i love this story", 1),
    ("the script is stupid", 0),
    ("great actors and a great ending", 1),
    ("awful plot , bad scene", 0),
]


def make_tokenizer():
    """A BERT-style WordPiece tokenizer over ``WORDS`` (vocab ~60), as a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "!"] + WORDS
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return tok


def make_tiny_bert(
    num_labels: int | None = 2, layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0, init_range: float = 0.02
):
    """A tiny BertForSequenceClassification (or BertModel when ``num_labels`` is None), eval mode.

    With the default ``init_range`` a random BERT's outputs barely depend on its input; a larger
    one (0.2 and up) gives logits that vary from sentence to sentence, like a trained model's.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(WORDS) + 8,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=init_range,
    )
    if num_labels is None:
        model = BertModel(config)
    else:
        config.num_labels = num_labels
        config.id2label = {i: f"label{i}" for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = BertForSequenceClassification(config)
    return model.eval()


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture
def tiny_texts():
    return list(TINY_TEXTS)
