"""Knowledge distillation: the loss against a hand computation, alpha=0 is plain CE training, the
teacher is never trained, and the QAT/CLI paths record the settings. Tiny BERTs only."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_TEXTS, make_tiny_bert, make_tokenizer

from qbert_edge.data import Dataset, Example
from qbert_edge.distill import DistillConfig, distillation_loss
from qbert_edge.errors import QbertEdgeError
from qbert_edge.train import fine_tune, predict_logits

TINY = Dataset("tiny", tuple(Example(t, y) for t, y in TINY_TEXTS), ("neg", "pos"))
ARGS = {"lr": 5e-3, "batch_size": 4, "max_length": 16, "progress": False}


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_loss_matches_a_hand_computation():
    student = [[1.0, -0.5, 0.25], [0.0, 2.0, -1.0]]
    teacher = [[3.0, 0.0, -1.0], [-0.5, 0.5, 1.5]]
    labels = [2, 1]
    alpha, t = 0.3, 2.5
    kl = sum(sum(p * math.log(p / q) for p, q in zip(_softmax(tr, t), _softmax(sr, t)))
             for sr, tr in zip(student, teacher)) / len(student)
    ce = sum(-math.log(_softmax(sr, 1.0)[y]) for sr, y in zip(student, labels)) / len(student)
    expected = alpha * t * t * kl + (1 - alpha) * ce
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), DistillConfig(alpha, t))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # a given CE replaces the computed one; alpha 1 is the KL term alone
    assert float(distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels),
                                   DistillConfig(alpha, t), ce=torch.tensor(10.0))) == pytest.approx(
        alpha * t * t * kl + (1 - alpha) * 10.0, rel=1e-6)
    only_kl = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), DistillConfig(1.0, t))
    assert float(only_kl) == pytest.approx(t * t * kl, rel=1e-6)


def test_no_gradient_reaches_the_teacher_logits():
    s = torch.tensor([[1.0, -1.0]], requires_grad=True)
    te = torch.tensor([[0.0, 2.0]], requires_grad=True)
    distillation_loss(s, te, torch.tensor([0]), DistillConfig(0.7, 2.0)).backward()
    assert te.grad is None and s.grad is not None and float(s.grad.abs().sum()) > 0


def test_config_is_validated():
    with pytest.raises(QbertEdgeError, match="alpha"):
        DistillConfig(1.5, 2.0)
    with pytest.raises(QbertEdgeError, match="temperature"):
        DistillConfig(0.5, 0.0)
    with pytest.raises(QbertEdgeError, match="differ"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), DistillConfig())
    with pytest.raises(QbertEdgeError, match="without a teacher"):
        fine_tune(make_tiny_bert(), TINY, make_tokenizer(), epochs=1, seed=0, distill=DistillConfig(), **ARGS)


def test_alpha_zero_is_exactly_the_old_training():
    plain = make_tiny_bert(seed=0)
    r_plain = fine_tune(plain, TINY, make_tokenizer(), epochs=3, seed=0, **ARGS)
    student = make_tiny_bert(seed=0)
    teacher = make_tiny_bert(seed=7, init_range=0.5)
    r_kd = fine_tune(student, TINY, make_tokenizer(), epochs=3, seed=0, teacher=teacher,
                     distill=DistillConfig(0.0, 2.0), **ARGS)
    assert r_kd.losses == r_plain.losses
    for (name, a), b in zip(plain.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name
    assert r_kd.config.distill == DistillConfig(0.0, 2.0) and r_plain.config.distill is None
    assert r_kd.to_dict()["config"]["distill"] == {"alpha": 0.0, "temperature": 2.0, "hidden": 0.0}


def test_teacher_gets_no_gradients_and_the_student_learns_from_it():
    teacher = make_tiny_bert(seed=7, init_range=0.5)
    teacher.train()  # its mode is restored afterwards; it runs in eval mode meanwhile
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_tiny_bert(seed=0)
    tok = make_tokenizer()

    def kl_to_teacher():
        s = torch.from_numpy(predict_logits(student, TINY, tok, 8, 16))
        t = torch.from_numpy(predict_logits(teacher, TINY, tok, 8, 16))
        return float(torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True))

    start = kl_to_teacher()
    r_kd = fine_tune(student, TINY, tok, epochs=20, seed=0, teacher=teacher, distill=DistillConfig(1.0, 1.0), **ARGS)
    assert teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert kl_to_teacher() < 0.2 * start
    r_ce = fine_tune(make_tiny_bert(seed=0), TINY, tok, epochs=1, seed=0, **ARGS)
    assert r_kd.losses[0] != r_ce.losses[0]


def test_qat_quantize_distils_from_the_fp32_model_and_records_it():
    from qbert_edge.checkpoint import LoadedModel
    from qbert_edge.plan import uniform_plan
    from qbert_edge.qmodel import quantizable_shapes
    from qbert_edge.quantize import qat_quantize

    def loaded():
        model = make_tiny_bert(seed=0, init_range=0.3)
        return LoadedModel(model=model, tokenizer=make_tokenizer(), name="tiny", labels=["neg", "pos"], max_length=16)

    a = loaded()
    plan = uniform_plan(quantizable_shapes(a.model), 2, 2)
    out = qat_quantize(a, plan, TINY, lr=1e-3, batch_size=4, max_length=16, max_steps=4, progress=False,
                       distill=DistillConfig(0.8, 3.0))
    assert out.meta["distill"] == {"teacher": "tiny (fp32)", "alpha": 0.8, "temperature": 3.0, "hidden": 0.0}
    assert out.meta["training"]["config"]["distill"] == {"alpha": 0.8, "temperature": 3.0, "hidden": 0.0}
    plain = qat_quantize(loaded(), plan, TINY, lr=1e-3, batch_size=4, max_length=16, max_steps=4, progress=False)
    assert plain.meta["distill"] is None
    assert out.meta["training"]["first_loss"] != plain.meta["training"]["first_loss"]


def test_cli_distill_flag(tmp_path, tiny_tokenizer, capsys):
    import csv

    from qbert_edge.checkpoint import load_quantized
    from qbert_edge.cli import main

    model_dir = tmp_path / "tiny"
    model = make_tiny_bert(init_range=0.3)
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    model.save_pretrained(model_dir)
    tiny_tokenizer.save(str(model_dir / "tokenizer.json"))
    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([t, ["negative", "positive"][y]] for t, y in TINY_TEXTS)
    out = tmp_path / "model.pt"
    main(["quantize", str(model_dir), "--bits", "4", "--groups", "2", "--data", str(data), "--batch-size", "4",
          "--max-steps", "2", "--distill", "--distill-alpha", "0.9", "--distill-temperature", "4", "-o", str(out)])
    assert "distilled alpha 0.9 T 4" in capsys.readouterr().out
    meta = load_quantized(out).meta
    assert meta["distill"]["alpha"] == 0.9 and meta["distill"]["temperature"] == 4.0
    assert meta["distill"]["teacher"].endswith("(fp32)")
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(model_dir), "--bits", "4", "--direct", "--distill", "--data", str(data),
              "-o", str(tmp_path / "x.pt")])
    assert exc.value.code == 2 and "--distill" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_hidden_state_loss_ignores_padding_and_averages_layers():
    import torch

    from qbert_edge.distill import hidden_state_loss

    student = (torch.zeros(1, 3, 2), torch.ones(1, 3, 2) * 2)
    teacher = (torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))
    teacher[1][0, 2] = 100.0  # a padded position: must not count
    mask = torch.tensor([[1, 1, 0]])
    assert float(hidden_state_loss(student, teacher, mask)) == 2.0  # (0 + 4) / 2 layers


def test_hidden_state_distillation_trains_and_is_off_by_default(tiny_tokenizer):
    import copy

    assert DistillConfig().hidden == 0.0
    with pytest.raises(QbertEdgeError, match="hidden-state distillation weight"):
        DistillConfig(hidden=-1.0)
    student = make_tiny_bert(init_range=0.2)
    teacher = copy.deepcopy(student)
    plain = fine_tune(copy.deepcopy(student), TINY, tiny_tokenizer, epochs=1, seed=0, teacher=teacher,
                      distill=DistillConfig(0.5, 2.0), **ARGS)
    hidden = fine_tune(copy.deepcopy(student), TINY, tiny_tokenizer, epochs=1, seed=0, teacher=teacher,
                       distill=DistillConfig(0.5, 2.0, hidden=1.0), **ARGS)
    assert len(hidden.losses) == len(plain.losses) and all(map(math.isfinite, hidden.losses))
    # same seed, same dropout masks: at step 1 the hidden term (>= 0) is the only difference
    assert hidden.losses[0] >= plain.losses[0] - 1e-6
    assert hidden.losses != plain.losses
