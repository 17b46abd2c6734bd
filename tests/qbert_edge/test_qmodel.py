import pytest
import torch

from conftest import TINY_TEXTS, make_tiny_bert
from qbert_edge.errors import QbertEdgeError
from qbert_edge.plan import uniform_plan
from qbert_edge.qmodel import (
    QuantEmbedding,
    QuantLinear,
    calibrate,
    freeze,
    quantizable_shapes,
    quantize_model,
)
from qbert_edge.quant import quant_params
from qbert_edge.runtime.text import encode


def batch(tokenizer, texts=None):
    enc = encode(tokenizer, texts or [t for t, _ in TINY_TEXTS], max_length=16)
    return {k: torch.from_numpy(v) for k, v in enc.arrays.items()}


def test_shapes_cover_every_quantizable_module(tiny_bert):
    shapes = quantizable_shapes(tiny_bert)
    assert len(shapes) == 3 + 2 * 6 + 2
    assert shapes["encoder.layer.1.intermediate.dense"] == (64, 32)
    assert shapes["classifier"] == (2, 32)
    bare = make_tiny_bert(num_labels=None)
    assert "classifier" not in quantizable_shapes(bare)


def test_8_bit_keeps_logits_close(tiny_tokenizer):
    tiny_bert = make_tiny_bert(init_range=0.2)  # logits that vary from sentence to sentence
    b = batch(tiny_tokenizer)
    with torch.no_grad():
        ref = tiny_bert(**b).logits
    quantize_model(tiny_bert, uniform_plan(quantizable_shapes(tiny_bert), 8, groups=8))
    calibrate(tiny_bert, [b])
    freeze(tiny_bert)
    with torch.no_grad():
        out = tiny_bert(**b).logits
    centred = [(x - x.mean(0)).flatten() for x in (ref, out)]
    assert torch.nn.functional.cosine_similarity(*centred, dim=0) > 0.999


def test_modules_are_swapped_as_the_plan_says(tiny_bert):
    shapes = quantizable_shapes(tiny_bert)
    plan = uniform_plan(shapes, 3, groups=4, layer_bits={1: 2}, embedding_bits={"word": 4, "position": 8, "token_type": None})
    quantize_model(tiny_bert, plan)
    layer0 = tiny_bert.bert.encoder.layer[0]
    assert isinstance(layer0.attention.self.query, QuantLinear) and layer0.attention.self.query.spec.bits == 3
    assert tiny_bert.bert.encoder.layer[1].output.dense.spec.bits == 2
    assert isinstance(tiny_bert.bert.embeddings.word_embeddings, QuantEmbedding)
    assert not isinstance(tiny_bert.bert.embeddings.token_type_embeddings, QuantEmbedding)
    assert isinstance(tiny_bert.classifier, QuantLinear)


def test_frozen_codes_are_what_the_model_computes(tiny_bert, tiny_tokenizer):
    quantize_model(tiny_bert, uniform_plan(quantizable_shapes(tiny_bert), 2, groups=4))
    b = batch(tiny_tokenizer)
    calibrate(tiny_bert, [b])
    codes = freeze(tiny_bert)
    q = codes["encoder.layer.0.attention.self.query"]
    assert int(q.codes.max()) <= 3
    assert torch.equal(tiny_bert.bert.encoder.layer[0].attention.self.query.weight.detach(), q.dequantize())


def test_activation_observer_tracks_in_training_and_freezes_in_eval(tiny_bert, tiny_tokenizer):
    quantize_model(tiny_bert, uniform_plan(quantizable_shapes(tiny_bert), 4, groups=4))
    observer = tiny_bert.bert.encoder.layer[0].attention.self.query.input_quant
    b = batch(tiny_tokenizer)
    tiny_bert.train()
    tiny_bert(**b)
    lo, hi = float(observer.lo), float(observer.hi)
    assert lo < 0 < hi and int(observer.seen) == 1
    tiny_bert.eval()
    tiny_bert(**batch(tiny_tokenizer, ["awful awful awful"]))
    assert (float(observer.lo), float(observer.hi)) == (lo, hi)


def test_plan_for_another_model_leaves_the_model_untouched(tiny_bert):
    bigger = make_tiny_bert(layers=3)
    plan = uniform_plan(quantizable_shapes(bigger), 4, groups=4)
    with pytest.raises(QbertEdgeError, match=r"encoder\.layer\.2\..* does not exist"):
        quantize_model(tiny_bert, plan)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in tiny_bert.modules())


def test_unsupported_model_is_refused():
    with pytest.raises(QbertEdgeError, match="not a transformers BERT"):
        quantize_model(torch.nn.Linear(4, 4), uniform_plan({}, 4))


def test_quantizing_twice_is_refused(tiny_bert):
    plan = uniform_plan(quantizable_shapes(tiny_bert), 4, groups=4)
    quantize_model(tiny_bert, plan)
    with pytest.raises(QbertEdgeError, match="already quantized"):
        quantize_model(tiny_bert, plan)


def test_mse_clip_training_simulates_the_frozen_codes(tiny_bert, tiny_tokenizer):
    quantize_model(tiny_bert, uniform_plan(quantizable_shapes(tiny_bert), 2, groups=4, clip="mse"))
    b = batch(tiny_tokenizer)
    calibrate(tiny_bert, [b])
    query = tiny_bert.bert.encoder.layer[0].attention.self.query
    shrink = query.range_shrink()
    assert shrink is not None and (shrink < 1).any()  # 2 bits: clipping pays on trained-like weights
    tiny_bert.eval()
    with torch.no_grad():
        simulated = tiny_bert(**b).logits
    with torch.no_grad():
        query.weight.mul_(1.01)  # a training step moves the weights; the shrink factors stay
    assert query.range_shrink() is shrink
    with torch.no_grad():
        query.weight.div_(1.01)
    expected_scale = quant_params(query.weight, 2, 4, False, shrink)[0]
    assert not torch.equal(expected_scale, quant_params(query.weight, 2, 4, False)[0])
    codes = freeze(tiny_bert)
    with torch.no_grad():
        frozen = tiny_bert(**b).logits
    assert torch.allclose(simulated, frozen, atol=1e-6)
    assert torch.equal(codes["encoder.layer.0.attention.self.query"].scale, expected_scale)


@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_embedding_fake_quantizes_only_the_rows_it_reads_with_the_same_numbers(clip):
    from qbert_edge.plan import ModuleQuant
    from qbert_edge.quant import fake_quantize

    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 8, padding_idx=0)
    emb = QuantEmbedding(table, ModuleQuant(bits=2, groups=50, shape=(50, 8), clip=clip))
    ids = torch.tensor([[0, 7, 7, 3], [49, 0, 3, 12]])
    out = emb(ids)
    whole = torch.nn.functional.embedding(ids, fake_quantize(emb.weight, emb.spec, emb.range_shrink()))
    assert torch.equal(out, whole)
    out.sum().backward()
    grad = emb.weight.grad
    assert torch.equal(grad[0], torch.zeros(8))  # padding row: no gradient, as F.embedding
    assert grad[7].abs().sum() > 0 and grad[1].abs().sum() == 0  # a row read twice learns; an unread row does not
