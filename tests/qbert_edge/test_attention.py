import copy

import numpy as np
import pytest
import torch

from conftest import TINY_TEXTS, make_tiny_bert
from qbert_edge.attention import attention_kl, plot_attention_kl
from qbert_edge.errors import QbertEdgeError
from qbert_edge.plan import uniform_plan
from qbert_edge.qmodel import calibrate, freeze, quantizable_shapes, quantize_model
from qbert_edge.runtime.text import encode


def batches(tokenizer):
    enc = encode(tokenizer, [t for t, _ in TINY_TEXTS], max_length=16)
    return [{k: torch.from_numpy(v) for k, v in enc.arrays.items()}]


def test_identical_models_have_zero_kl(tiny_tokenizer):
    a = make_tiny_bert(init_range=0.3)
    kl = attention_kl(a, copy.deepcopy(a), batches(tiny_tokenizer))
    assert kl.shape == (2, 4)
    assert np.allclose(kl, 0, atol=1e-6)


def test_lower_bits_diverge_more(tiny_tokenizer, tmp_path):
    fp32 = make_tiny_bert(init_range=0.3)
    kls = []
    for bits in (8, 2):
        q = copy.deepcopy(fp32)
        quantize_model(q, uniform_plan(quantizable_shapes(q), bits, groups=1))
        calibrate(q, batches(tiny_tokenizer))
        freeze(q)
        kls.append(attention_kl(fp32, q, batches(tiny_tokenizer)))
    assert (kls[0] >= 0).all() and kls[1].mean() > 10 * kls[0].mean()
    plot_attention_kl(kls[1], tmp_path / "kl.png", "tiny")
    assert (tmp_path / "kl.png").read_bytes()[:4] == b"\x89PNG"


def test_shape_mismatch(tiny_tokenizer):
    with pytest.raises(QbertEdgeError, match="differ in shape"):
        attention_kl(make_tiny_bert(), make_tiny_bert(layers=3), batches(tiny_tokenizer))
