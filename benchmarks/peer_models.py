"""Model files the benchmarks compare: qbert-edge's own and those of the tools a user would pick instead.

    from peer_models import build_bert_base, ort_int8, ort_nbits, quantize_ours
    ort_int8(fp32_onnx, out_onnx, per_channel=True)

Shared by ``benchmarks/runtime.py`` and ``benchmarks/peers.py``. Each builder writes one file
(atomically, through a temporary name) and does nothing if the file exists already, so a benchmark
builds its models once per work directory. What this module does not do: measure anything (see
:mod:`qbert_edge.runtime.memory`) or choose which variants a benchmark runs.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("benchmarks.peer_models")


#: modules the builders need beyond the base install: ``pip install -e '.[train,bench]'``
NEEDS = {"torch": "train", "transformers": "train", "matplotlib": "train", "onnx_ir": "bench"}


def distill_note(distill) -> str:
    """``"alpha 0.5, T 2"`` (``", hidden 1"`` added when the hidden-state term is on) of a DistillConfig."""
    return f"alpha {distill.alpha:g}, T {distill.temperature:g}" + (f", hidden {distill.hidden:g}" if distill.hidden else "")


def check_installed() -> None:
    """Fail at once, naming the extra to install, if a builder's module is missing (not an hour in)."""
    import importlib.util

    missing = sorted(m for m in NEEDS if importlib.util.find_spec(m) is None)
    if missing:
        extras = ",".join(sorted({NEEDS[m] for m in missing}))
        raise SystemExit(f"benchmarks: missing {', '.join(missing)}: pip install -e '.[{extras}]'")


def _fresh(out: Path) -> Path | None:
    """``None`` if ``out`` exists already, else a temporary path beside it to write to."""
    if out.exists():
        return None
    return out.with_name(out.name + ".tmp" + out.suffix)


def build_bert_base(workdir: Path) -> Path:
    """A random-weight BERT-base directory with the BERT-uncased tokenizer of all-MiniLM-L6-v2."""
    out = workdir / "bert-base-random"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import BertConfig, BertModel

    from qbert_edge.reference import base_model_path as minilm_path

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    tmp = workdir / "bert-base-random.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm_path() / name).is_file():
            shutil.copy(minilm_path() / name, tmp / name)
    tmp.rename(out)
    return out


def export_onnx(source: str | Path, out: Path) -> Path:
    """qbert-edge's exporter (portable target, no validation): a model directory/spec or a ``model.pt``."""
    tmp = _fresh(out)
    if tmp is not None:
        from qbert_edge.exporters.onnx_export import export_file

        log.info("exporting %s -> %s", source, out.name)
        export_file(str(source), tmp, validate=False)
        os.replace(tmp, out)
    return out


def ort_optimized(fp32: Path, out: Path, num_heads: int, hidden_size: int) -> Path:
    """``onnxruntime.transformers.optimizer`` (BERT fusions) of ``fp32``."""
    tmp = _fresh(out)
    if tmp is not None:
        from onnxruntime.transformers.optimizer import optimize_model

        log.info("onnxruntime.transformers.optimizer -> %s", out.name)
        opt = optimize_model(str(fp32), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
        log.info("fusions: %s", opt.get_fused_operator_statistics())
        opt.save_model_to_file(str(tmp))
        os.replace(tmp, out)
    return out


def ort_int8(fp32: Path, out: Path, per_channel: bool = False) -> Path:
    """``onnxruntime.quantization.quantize_dynamic`` of ``fp32``: int8 weights (QInt8)."""
    tmp = _fresh(out)
    if tmp is not None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        log.info("quantize_dynamic per_channel=%s -> %s", per_channel, out.name)
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel)
        os.replace(tmp, out)
    return out


def ort_nbits(fp32: Path, out: Path, block_size: int = 32, gather: bool = True) -> Path:
    """``MatMulNBitsQuantizer`` 4-bit asymmetric weight-only of ``fp32``; ``gather`` also
    quantizes the embedding tables (``GatherBlockQuantized``)."""
    tmp = _fresh(out)
    if tmp is not None:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        log.info("MatMulNBitsQuantizer 4-bit block %d gather=%s -> %s", block_size, gather, out.name)
        ops = ("MatMul", "Gather") if gather else ("MatMul",)
        axes = (("MatMul", 0), ("Gather", 1)) if gather else (("MatMul", 0),)
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=block_size, is_symmetric=False,
                                 op_types_to_quantize=ops, quant_axes=axes)
        q.process()
        q.model.save_model_to_file(str(tmp), use_external_data_format=False)
        os.replace(tmp, out)
    return out


def torch_module(source: str | Path, out: Path, dynamic_int8: bool = False) -> Path:
    """The PyTorch model of ``source`` pickled whole (``torch.save``), optionally after
    ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear`` to int8."""
    tmp = _fresh(out)
    if tmp is not None:
        import torch

        from qbert_edge.loading import load_model

        model = load_model(str(source)).model.eval()
        if dynamic_int8:
            log.info("torch quantize_dynamic int8 -> %s", out.name)
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        torch.save(model, tmp)
        os.replace(tmp, out)
    return out


def plan_digest(plan, qat_steps: int = 0, lr: float = 0.0, distill=None, seed: int = 0) -> str:
    """8 hex digits naming a plan's numbers (bits, groups, symmetric, clip of every module; activation
    bits) and the method (``qat_steps``, ``lr``, the distillation settings ``distill``, a
    :class:`qbert_edge.distill.DistillConfig` or ``None``, the QAT ``seed``): a cached file is reused
    only for the same ones. A DirectQ plan with min/max ranges has the digest files made before
    those options existed carry; QAT files made before batches were grouped by length do not match."""
    import hashlib
    import json

    numbers = {name: [q.bits, q.groups, q.symmetric] + ([q.clip] if q.clip != "minmax" else [])
               for name, q in plan.modules.items()}  # min/max ranges keep the digest of files made before clip
    method = [qat_steps, lr if qat_steps else 0.0]
    if distill is not None and qat_steps:
        method += [distill.alpha, distill.temperature] + (["hidden", distill.hidden] if distill.hidden else [])
    if seed and qat_steps:
        method += ["seed", seed]
    if qat_steps:
        method += ["length-grouped batches"]  # QAT batches are grouped by length (qat_quantize's default)
    text = json.dumps([numbers, plan.activation_bits, *method], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def quantize_ours(source: str | Path, out: Path, plan, qat_steps: int = 0, lr: float = 5e-5, distill=None,
                  seed: int = 0) -> Path:
    """qbert-edge with ``plan`` (a :class:`qbert_edge.plan.Plan`, checked against the model):
    DirectQ calibrated on 64 Rotten Tomatoes sentences, or QAT for ``qat_steps`` steps of batch 32
    at ``lr`` on ``rt:train`` (max length 64, as ``benchmarks/reproduce.py``) when ``qat_steps`` > 0,
    distilled from the fp32 ``source`` with ``distill`` (a :class:`qbert_edge.distill.DistillConfig`)
    if given; ``seed`` seeds the QAT data order (length-grouped batches) and dropout. Writes a ``model.pt``."""
    tmp = _fresh(out)
    if tmp is not None:
        from qbert_edge.checkpoint import save_quantized
        from qbert_edge.data import load_data, subsets, torch_batches
        from qbert_edge.loading import load_model
        from qbert_edge.qmodel import quantizable_shapes
        from qbert_edge.quantize import direct_quantize, qat_quantize

        loaded = load_model(str(source))
        plan.check_model(quantizable_shapes(loaded.model))
        train = load_data("rt:train")
        scheme = plan.meta.get("scheme", "?")
        t0 = time.perf_counter()
        if qat_steps > 0:
            kd = f", distilled ({distill_note(distill)})" if distill is not None else ""
            log.info("QAT %s, %d steps at lr %g%s -> %s", scheme, qat_steps, lr, kd, out.name)
            epochs = math.ceil(qat_steps / math.ceil(len(train) / 32))  # max_steps only stops early
            result = qat_quantize(loaded, plan, train, epochs=epochs, max_steps=qat_steps, lr=lr, progress=False,
                                  distill=distill, seed=seed, group_by_length=True)  # as plan_digest says
        else:
            log.info("DirectQ %s -> %s", scheme, out.name)
            calib = subsets(train, 1, 64 / len(train), 0)[0]
            result = direct_quantize(loaded, plan, torch_batches(calib, loaded.tokenizer, 32, 128))
        log.info("%s built in %.0f s", out.name, time.perf_counter() - t0)
        save_quantized(result, tmp)
        os.replace(tmp, out)
    return out


def _quantize_job(source: str, out: str, plan: dict, qat_steps: int, lr: float, distill, seed: int, threads: int) -> str:
    """One :func:`quantize_ours` in a worker process (a plan travels as its dict)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from qbert_edge.plan import Plan

    if threads:
        torch.set_num_threads(threads)
    quantize_ours(source, Path(out), Plan.from_dict(plan), qat_steps, lr, distill, seed)
    return out


def quantize_many(source: str | Path, jobs: list[dict], workers: int = 1, until: float | None = None) -> list[Path]:
    """:func:`quantize_ours` for each job (its keyword arguments: ``out``, ``plan``, ``qat_steps``,
    ``lr``, ``distill``, ``seed``), in order, ``workers`` at a time; a job not started by the
    time ``until`` (epoch s) is skipped. The files that exist afterwards, in job order.

    More than one worker: each is a fresh process with one torch thread. On two cores, two
    one-thread MiniLM training loops got through 8% more steps than one two-thread loop (2.8 s
    per step each against 1.52 s, batch 32 x 64 tokens): the 384-wide matrices keep a second
    thread only partly busy."""
    def late(job) -> bool:
        if until and time.time() > until and not job["out"].exists():
            log.warning("build time limit reached: %s not built", job["out"].name)
            return True
        return False

    if workers <= 1:
        for job in jobs:
            if not late(job):
                quantize_ours(source, **job)
        return [j["out"] for j in jobs if j["out"].exists()]
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending, running = list(jobs), set()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                if job["out"].exists() or late(job):
                    continue
                running.add(pool.submit(_quantize_job, str(source), str(job["out"]), job["plan"].to_dict(),
                                        job["qat_steps"], job["lr"], job["distill"], job["seed"], 1))
            done, running = wait(running, return_when=FIRST_COMPLETED) if running else (set(), set())
            for future in done:
                future.result()  # a worker's error stops the benchmark, as it would inline
    return [j["out"] for j in jobs if j["out"].exists()]
