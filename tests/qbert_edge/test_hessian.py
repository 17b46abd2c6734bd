"""Hessian sensitivity: power iteration vs the exact Hessian block of a tiny BERT, HVPs, subsets, files."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import TINY_TEXTS, make_tiny_bert, make_tokenizer

from qbert_edge import hessian
from qbert_edge.errors import QbertEdgeError
from qbert_edge.sensitivity import Landscape, LayerSensitivity, Sensitivity, diagnose


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are ~40x slower with 2 threads on a busy 2-core machine (oversubscription)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def curvy_bert(seed: int = 0):
    """A 2-layer, hidden-8 BERT classifier with weights large enough to have real curvature."""
    model = make_tiny_bert(layers=2, hidden=8, heads=2, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("encoder.layer" in name or name.startswith("classifier")):
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if name.startswith("classifier") else 0.5))
    return model


def make_batches(model, sizes=((4, 7), (3, 5)), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, length in sizes:
        ids = torch.randint(5, model.config.vocab_size, (n, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, length - 2 :] = 0
        out.append({
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 2, (n,), generator=gen),
        })
    return out


def exact_block(model, batches, layer, loss_fn=hessian.task_loss) -> torch.Tensor:
    """H_ii by torch.autograd.functional.hessian on the layer's flattened weights."""
    from torch.func import functional_call

    params = list(hessian.layer_weights(model, [layer])[layer].values())
    names = {p: n for n, p in model.named_parameters()}
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    total = hessian.count_examples(batches)

    def f(flat):
        swap, start = {}, 0
        for p in params:
            swap[names[p]] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()

        def call(**kw):
            return functional_call(model, swap, kwargs=kw)

        return sum(loss_fn(call, b) for b in batches) / total

    with hessian.hessian_mode(model, params):
        H = torch.autograd.functional.hessian(f, flat0, vectorize=True)
    return (H + H.T) / 2


def dominant(eigs: torch.Tensor) -> float:
    return float(eigs[eigs.abs().argmax()])


def negated(model, batch):
    return -hessian.task_loss(model, batch)


# --------------------------------------------------------------------------- correctness vs exact


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = curvy_bert()
    batches = make_batches(model)
    exact = {i: torch.linalg.eigvalsh(exact_block(model, batches, i)) for i in (0, 1)}
    return model, batches, exact


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_eigen_solver_matches_exact_hessian_block(setup, method):
    model, batches, exact = setup
    res = hessian.layer_sensitivity(model, batches, max_iter=1000, tol=1e-7, seed=0, method=method)
    assert set(res) == {0, 1}
    for i, r in res.items():
        want = dominant(exact[i])
        assert r.converged, (i, r.iterations)
        assert abs(r.eigenvalue - want) <= 0.01 * abs(want), (i, r.eigenvalue, want)


def test_negative_dominant_eigenvalue_keeps_its_sign(setup, caplog):
    model, batches, exact = setup
    # The Hessian of -loss is -H: its dominant eigenvalue is minus that of H, for either sign.
    res = hessian.layer_sensitivity(model, batches, max_iter=1000, tol=1e-7, loss_fn=negated)
    for i, r in res.items():
        want = -dominant(exact[i])
        assert abs(r.eigenvalue - want) <= 0.01 * abs(want)
    # a layer whose H has a positive dominant eigenvalue becomes negative: reported as not at a minimum
    pos = [i for i in (0, 1) if dominant(exact[i]) > 0]
    assert pos, "fixture should have a layer with positive dominant eigenvalue"
    with caplog.at_level(logging.WARNING, logger="qbert_edge.hessian"):
        sens, _ = hessian.analyze(model, [batches, batches], pos, max_iter=300, tol=1e-5, loss_fn=negated)
    assert all(x < 0 for x in sens.layer(pos[0]).eigenvalues)
    assert any("not at a minimum" in w for w in sens.warnings)
    assert any("not at a minimum" in r.getMessage() for r in caplog.records)
    assert sens.to_dict()["layers"][0]["dominant_negative"] == [True, True]


def test_power_iteration_on_known_spectrum_negative_dominant():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    A = q @ torch.diag(torch.tensor([-5.0, 4.0, 2.0, 1.0, -0.5, 0.1], dtype=torch.float64)) @ q.T
    B = torch.diag(torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64))
    mats = {"a": A, "b": B}
    start = {"a": [torch.ones(6, dtype=torch.float64)], "b": [torch.ones(3, dtype=torch.float64)]}
    res = hessian.power_iteration(lambda v: {k: [mats[k] @ x[0]] for k, x in v.items()}, start, max_iter=500, tol=1e-10)
    assert res["a"].eigenvalue == pytest.approx(-5.0, rel=1e-6) and res["a"].converged
    assert res["b"].eigenvalue == pytest.approx(3.0, rel=1e-6) and res["b"].converged
    assert res["b"].iterations < res["a"].iterations  # blocks stop independently
    # deflation finds the next one by magnitude
    nxt = hessian.power_iteration(hessian.deflated(lambda v: {k: [mats[k] @ x[0]] for k, x in v.items()}, res),
                                  {"a": [torch.arange(6, dtype=torch.float64) + 1]}, max_iter=2000, tol=1e-10)
    assert nxt["a"].eigenvalue == pytest.approx(4.0, rel=1e-5)


def test_power_iteration_reports_no_convergence():
    A = torch.diag(torch.tensor([2.0, -2.0, 1.0], dtype=torch.float64))  # +-2: power iteration oscillates
    res = hessian.power_iteration(lambda v: {0: [A @ v[0][0]]}, {0: [torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)]},
                                  max_iter=20, tol=1e-6)
    assert not res[0].converged and res[0].iterations == 20
    assert res[0].history[-1] == pytest.approx(res[0].history[-2])  # steady Rayleigh quotient, yet no eigenvalue
    assert res[0].residual > 0.5
    with pytest.raises(QbertEdgeError, match="max_iter"):
        hessian.power_iteration(lambda v: v, {0: [torch.ones(2)]}, max_iter=0)


def test_hvp_matches_finite_difference_of_gradients():
    model = curvy_bert(seed=1).double()
    batches = make_batches(model, seed=3)
    weights = {i: list(w.values()) for i, w in hessian.layer_weights(model).items()}
    gen = torch.Generator().manual_seed(5)
    vectors = {i: [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps] for i, ps in weights.items()}
    params = [p for ps in weights.values() for p in ps]
    eps = 1e-5
    with hessian.hessian_mode(model, params):
        hv = hessian.hvp(model, batches, weights, vectors)
        for i, ps in weights.items():
            with torch.no_grad():
                for p, v in zip(ps, vectors[i]):
                    p.add_(eps * v)
            gp = hessian.gradients(model, batches, {i: ps})[i]
            with torch.no_grad():
                for p, v in zip(ps, vectors[i]):
                    p.sub_(2 * eps * v)
            gm = hessian.gradients(model, batches, {i: ps})[i]
            with torch.no_grad():
                for p, v in zip(ps, vectors[i]):
                    p.add_(eps * v)
            fd = torch.cat([((a - b) / (2 * eps)).reshape(-1) for a, b in zip(gp, gm)])
            got = torch.cat([h.reshape(-1) for h in hv[i]])
            assert torch.allclose(got, fd, rtol=1e-5, atol=1e-7 * float(fd.abs().max())), i
            # and it is the diagonal block only: the full H v differs in block i
    full = _full_hvp(model, batches, params, [v for i in weights for v in vectors[i]])
    assert not torch.allclose(torch.cat([h.reshape(-1) for h in hv[0]]), full[: sum(p.numel() for p in weights[0])])


def _full_hvp(model, batches, params, vecs):
    with hessian.hessian_mode(model, params):
        total = hessian.count_examples(batches)
        out = None
        for b in batches:
            g = torch.autograd.grad(hessian.task_loss(model, b) / total, params, create_graph=True)
            hv = torch.autograd.grad(sum((x * v).sum() for x, v in zip(g, vecs)), params)
            flat = torch.cat([h.reshape(-1) for h in hv])
            out = flat if out is None else out + flat
    return out


def test_model_state_is_restored(setup):
    model, batches, _ = setup
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hessian.layer_sensitivity(model, batches, max_iter=2)
    assert model.training
    assert model.config._attn_implementation == "sdpa"
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()


# --------------------------------------------------------------------------- determinism and subsets


def test_same_seed_same_numbers_different_subsets_differ(setup):
    model, _, _ = setup
    subs = [make_batches(model, seed=s) for s in (10, 11, 12)]
    a, _ = hessian.analyze(model, subs, max_iter=30, tol=1e-4, seed=4)
    b, _ = hessian.analyze(model, subs, max_iter=30, tol=1e-4, seed=4)
    assert a.layers == b.layers
    for l in a.layers:
        assert len(set(l.eigenvalues)) == 3  # each subset has its own Hessian
        assert l.mean == pytest.approx(sum(l.eigenvalues) / 3)
        assert l.std == pytest.approx(float(torch.tensor(l.eigenvalues, dtype=torch.float64).std(unbiased=False)))
        assert l.omega == pytest.approx(abs(l.mean) + l.std)
    assert a.timings["hvp_passes"] > 0 and len(a.timings["per_subset_s"]) == 3
    assert a.shapes["encoder.layer.0.attention.self.query"] == (8, 8)
    assert a.layers[0].modules[0] == "encoder.layer.0.attention.self.query"
    assert a.layers[0].parameters == 4 * 64 + 2 * 128


def test_warm_start_gives_the_same_eigenvalues(setup):
    model, _, _ = setup
    subs = [make_batches(model, seed=s) for s in (20, 21)]
    cold, _ = hessian.analyze(model, subs, max_iter=1000, tol=1e-7, warm_start=False)
    warm, _ = hessian.analyze(model, subs, max_iter=1000, tol=1e-7, warm_start=True)
    for c, w in zip(cold.layers, warm.layers):
        for x, y in zip(c.eigenvalues, w.eigenvalues):
            assert y == pytest.approx(x, rel=1e-2)
    assert warm.settings["warm_start"] and not cold.settings["warm_start"]


def test_not_converged_is_reported(setup, caplog):
    model, batches, _ = setup
    with caplog.at_level(logging.WARNING):
        sens, _ = hessian.analyze(model, [batches], max_iter=2, tol=1e-9)
    assert not any(any(l.converged) for l in sens.layers)
    assert sum("did not converge" in w for w in sens.warnings) == 2
    assert any("did not converge" in r.getMessage() for r in caplog.records)


def test_bad_layers_and_models():
    model = curvy_bert()
    with pytest.raises(QbertEdgeError, match="layer 5 does not exist"):
        hessian.layer_weights(model, [5])
    with pytest.raises(QbertEdgeError, match="no classification head"):
        hessian.layer_weights(make_tiny_bert(num_labels=None))


# --------------------------------------------------------------------------- landscape


def test_top_two_eigenvectors_and_landscape(setup):
    model, batches, exact = setup
    layer = 0
    ev = exact[layer]
    by_mag = ev[ev.abs().argsort(descending=True)]
    pairs = hessian.top_eigenvectors(model, batches, layer, k=2, max_iter=3000, tol=1e-8)
    assert pairs[0].eigenvalue == pytest.approx(float(by_mag[0]), rel=1e-2)
    assert pairs[1].eigenvalue == pytest.approx(float(by_mag[1]), rel=1e-2)
    dot = sum(float((a * b).sum()) for a, b in zip(pairs[0].vector, pairs[1].vector))
    assert abs(dot) < 1e-2
    before = [p.detach().clone() for p in hessian.layer_weights(model, [layer])[layer].values()]
    land = hessian.loss_landscape(model, batches, layer, pairs, grid=5)
    after = list(hessian.layer_weights(model, [layer])[layer].values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert len(land.losses) == 5 and len(land.losses[0]) == 5
    assert land.losses[2][2] == pytest.approx(hessian.mean_loss(model, batches), rel=1e-5)
    assert land.radius == pytest.approx(math.sqrt(2 / abs(pairs[0].eigenvalue)))
    # small steps follow the quadratic model along u1: L(a) + L(-a) - 2 L(0) ~ lambda1 a^2
    small = hessian.loss_landscape(model, batches, layer, pairs, grid=3, radius=1e-2)
    curv = (small.losses[0][1] + small.losses[2][1] - 2 * small.losses[1][1]) / 1e-4
    assert curv == pytest.approx(pairs[0].eigenvalue, rel=5e-2)


# --------------------------------------------------------------------------- file format, warnings, plots


def _sens(eigs, model="m"):
    layers = [LayerSensitivity(i, tuple(e), (True,) * len(e), (5,) * len(e)) for i, e in enumerate(eigs)]
    shapes = {f"encoder.layer.{i}.attention.self.query": (4, 4) for i in range(len(eigs))}
    return Sensitivity(model, "d", len(eigs), tuple(layers), shapes, settings={"max_iter": 5, "tol": 1e-3})


def test_sensitivity_roundtrip_and_format_check(tmp_path):
    sens = _sens([[1.0, 3.0], [-2.0, -2.5], [0.5, 0.6]])
    sens = sens.with_warnings(diagnose(sens)).with_landscape(
        Landscape(1, (2.0, 1.0), 0.5, (-0.5, 0.0, 0.5), ((1, 2, 3), (4, 5, 6), (7, 8, 9)), 3))
    path = tmp_path / "s.json"
    sens.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "qbert-edge/sensitivity" and data["version"] == 1
    assert data["layers"][0]["omega"] == pytest.approx(3.0) and data["ranking"] == [0, 1, 2]
    back = Sensitivity.load(path)
    assert back.layers == sens.layers and back.warnings == sens.warnings and back.landscape == sens.landscape
    data["format"] = "qbert-edge/plan"
    path.write_text(json.dumps(data))
    with pytest.raises(QbertEdgeError, match="expected 'qbert-edge/sensitivity'"):
        Sensitivity.load(path)
    data["format"] = "qbert-edge/sensitivity"
    data["layers"][0]["converged"] = [True]
    path.write_text(json.dumps(data))
    with pytest.raises(QbertEdgeError, match="differ in length"):
        Sensitivity.load(path)


def test_diagnose_flags_wild_variation_and_negative_noise():
    warns = diagnose(_sens([[1.0, 10.0], [5.0, 5.1], [0.2, -0.1]]))
    assert any(w.startswith("layer 0: eigenvalue varies widely") for w in warns)
    assert not any(w.startswith("layer 1:") for w in warns)
    assert any(w.startswith("layer 2: the dominant eigenvalue is negative on 1 of 2") for w in warns)
    assert not any("not at a minimum" in w for w in warns)  # -0.1 once is within noise


def test_plots_write_pngs(tmp_path):
    from qbert_edge.plots import plot_landscape, plot_spread

    sens = _sens([[1.0, 3.0], [-2.0, -2.5]])
    plot_spread(sens, tmp_path / "s.png")
    land = Landscape(0, (2.0, 1.0), 1.0, (-1.0, 0.0, 1.0), ((2, 1, 2), (1, 0, 1), (2, 1, 2)), 8)
    plot_landscape(land, tmp_path / "l.png", model="m")
    for name in ("s.png", "l.png"):
        head = (tmp_path / name).read_bytes()
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"qbert-edge/" in head  # format/version in the PNG metadata


# --------------------------------------------------------------------------- command line


@pytest.fixture
def model_dir(tmp_path):
    model = curvy_bert()
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    make_tokenizer().save(str(d / "tokenizer.json"))
    data = tmp_path / "data.csv"
    names = ("negative", "positive")
    data.write_text("text,label\n" + "".join(f'"{t}",{names[y]}\n' for t, y in TINY_TEXTS * 2))
    return d, data


def test_cli_analyze_then_allocate(model_dir, tmp_path, capsys):
    from qbert_edge.cli import main
    from qbert_edge.plan import Plan

    d, data = model_dir
    out = tmp_path / "sens.json"
    main(["analyze", str(d), "--data", str(data), "--subsets", "2", "--fraction", "0.5", "--batch-size", "3",
          "--max-iter", "8", "--seed", "1", "-o", str(out), "--plot", str(tmp_path / "sens.png"),
          "--landscape", "1", "--landscape-grid", "3", "--landscape-examples", "4", "--threads", "1"])
    sens = Sensitivity.load(out)
    assert sens.subsets == 2 and [l.layer for l in sens.layers] == [0, 1]
    assert sens.settings["subset_examples"] == 8 and sens.settings["max_length"] == 64
    assert sens.settings["method"] == "lanczos"
    for l in sens.layers:  # the residual of every result is kept; a converged one met the Lanczos test
        assert len(l.residuals) == 2
        assert all(r <= 1e-3 ** 0.5 for r, ok in zip(l.residuals, l.converged) if ok)
    assert sens.landscape is not None and sens.landscape.layer == 1 and sens.landscape.examples == 4
    assert (tmp_path / "sens.png").stat().st_size > 1000
    assert (tmp_path / "sens.landscape.png").stat().st_size > 1000
    assert sens.timings["landscape_s"] > 0
    assert "rank" in capsys.readouterr().out
    plan_path = tmp_path / "plan.json"
    main(["allocate", str(out), "--scheme", "2/3", "--high-layers", "1", "-o", str(plan_path)])
    plan = Plan.load(plan_path)
    top = sens.ranking()[0]
    assert plan.modules[f"encoder.layer.{top}.output.dense"].bits == 3
    assert plan.modules[f"encoder.layer.{1 - top}.output.dense"].bits == 2


def test_cli_analyze_interrupted_writes_nothing(model_dir, tmp_path, monkeypatch):
    from qbert_edge.cli import main

    d, data = model_dir

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(hessian, "loss_landscape", boom)
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(d), "--data", str(data), "--subsets", "1", "--fraction", "0.5", "--max-iter", "2",
              "-o", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"), "--landscape", "0"])
    assert exc.value.code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "tiny"]


def test_cli_analyze_errors(model_dir, tmp_path, capsys):
    from qbert_edge.cli import main

    d, data = model_dir
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(d), "--data", str(data), "--landscape", "7", "-o", str(tmp_path / "s.json")])
    assert exc.value.code == 2
    assert "--landscape 7: the model has 2 encoder layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", str(d), "--data", str(data), "-o", str(tmp_path / "nope" / "s.json")])
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_real_minilm_layer_hvp_matches_finite_difference():
    """The real architecture (pretrained all-MiniLM-L6-v2, SDPA attention switched to eager) on 8 sentences."""
    from qbert_edge.data import Dataset, Example
    from qbert_edge.loading import load_model

    loaded = load_model("minilm", num_labels=2)
    model = loaded.model
    data = Dataset("tiny", tuple(Example(t, y) for t, y in TINY_TEXTS), ("negative", "positive"))
    batches = hessian.sorted_batches(data, loaded.tokenizer, 4, 16)
    weights = {5: list(hessian.layer_weights(model, [5])[5].values())}
    v = {5: hessian.random_direction(weights[5], 0)}
    eps = 1e-2
    with hessian.hessian_mode(model, weights[5]):
        hv = torch.cat([h.reshape(-1) for h in hessian.hvp(model, batches, weights, v)[5]])
        grads = []
        for step in (eps, -2 * eps, eps):  # theta + eps v, theta - eps v, back to theta
            with torch.no_grad():
                for p, d in zip(weights[5], v[5]):
                    p.add_(step * d)
            if len(grads) < 2:
                grads.append(torch.cat([g.reshape(-1) for g in hessian.gradients(model, batches, weights)[5]]))
    assert model.config._attn_implementation == "sdpa"
    fd = (grads[0] - grads[1]) / (2 * eps)
    cos = float(torch.nn.functional.cosine_similarity(hv, fd, dim=0))
    assert cos > 0.999, cos
    assert float(hv.norm()) == pytest.approx(float(fd.norm()), rel=1e-2)
