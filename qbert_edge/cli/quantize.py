"""``qbert-edge quantize``: a model + a plan -> model.pt (QAT by default, DirectQ with --direct)."""

from __future__ import annotations

from pathlib import Path

import click

from qbert_edge.errors import QbertEdgeError
from qbert_edge.plan import CLIPS


@click.command(name="quantize")
@click.argument("model")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="plan.json from `qbert-edge allocate`.")
@click.option("--bits", type=click.IntRange(2, 8), help="Uniform weight bits for every encoder Linear (instead of --plan).")
@click.option("--groups", type=click.IntRange(1), default=128, show_default=True, help="Groups of output rows per matrix (with --bits).")
@click.option("--embedding-bits", type=click.IntRange(2, 8), default=8, show_default=True, help="Bits of the word/position/token-type tables (with --bits).")
@click.option("--symmetric", is_flag=True, help="Symmetric ranges (zero point 2^(b-1)) instead of min/max (with --bits).")
@click.option("--clip", type=click.Choice(CLIPS), default="minmax", show_default=True,
              help="Group ranges: min/max, or narrowed per group to the least squared error (mse; better at 2-3 bits; with --bits).")
@click.option("--direct", is_flag=True, help="DirectQ: post-training quantization, no fine-tuning.")
@click.option("--data", default=None, help="Training data for QAT, calibration data for DirectQ: a CSV/TSV/JSONL file or rt:train. [default: rt:train]")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True)
@click.option("--lr", type=float, default=2e-5, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--max-length", type=click.IntRange(2), default=64, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Stop QAT after this many steps.")
@click.option("--group-by-length/--no-group-by-length", default=True, show_default=True,
              help="QAT batches of texts of similar length: about half the padding and half the time per step.")
@click.option("--calib-size", type=click.IntRange(1), default=256, show_default=True, help="Sentences that set the activation ranges (DirectQ).")
@click.option("--distill", is_flag=True, help="QAT distils from the fp32 MODEL (teacher): KL on softened logits + CE.")
@click.option("--distill-alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Weight of the distillation term (with --distill).")
@click.option("--distill-temperature", type=click.FloatRange(0, min_open=True), default=2.0, show_default=True, help="Softmax temperature (with --distill).")
@click.option("--distill-hidden", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Weight of the hidden-state term: MSE of every layer's output against the teacher's (with --distill).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write model.pt.")
def command(model, plan_path, bits, groups, embedding_bits, symmetric, clip, direct, data, epochs, lr, batch_size,
            max_length, max_steps, group_by_length, calib_size, distill, distill_alpha, distill_temperature, distill_hidden, seed,
            output) -> None:
    """Quantize MODEL (minilm, minilm-rt, a transformers directory or a state dict) -> model.pt.

    \b
    Examples:
      qbert-edge quantize minilm --bits 4 --direct -o minilm-w4.pt
      qbert-edge quantize minilm-rt --plan plan.json --data rt:train -o model.pt
      qbert-edge quantize minilm-rt --bits 4 --embedding-bits 4 --distill -o model.pt
    """
    if (plan_path is None) == (bits is None):
        raise QbertEdgeError("give exactly one of --plan plan.json or --bits B")
    if plan_path and (symmetric or clip != "minmax"):
        raise QbertEdgeError("--symmetric and --clip go with --bits; a plan.json carries its own (qbert-edge allocate --clip)")
    if distill and direct:
        raise QbertEdgeError("--distill trains, --direct does not: give one of them")
    output = Path(output)
    if str(output) == str(model) or (Path(model).exists() and output.resolve() == Path(model).resolve()):
        raise QbertEdgeError(f"{output}: refusing to overwrite the input model")
    if not output.parent.is_dir():
        raise QbertEdgeError(f"{output}: directory {output.parent} does not exist")

    import torch

    from qbert_edge.checkpoint import save_quantized
    from qbert_edge.data import load_data, subsets, torch_batches
    from qbert_edge.distill import DistillConfig
    from qbert_edge.loading import load_model
    from qbert_edge.plan import Plan, uniform_plan
    from qbert_edge.qmodel import quantizable_shapes
    from qbert_edge.quantize import direct_quantize, qat_quantize

    plan = Plan.load(plan_path) if plan_path else None
    torch.manual_seed(seed)
    loaded = load_model(model)
    if plan is None:
        embeddings = {"word": embedding_bits, "position": embedding_bits, "token_type": embedding_bits}
        plan = uniform_plan(quantizable_shapes(loaded.model), bits, groups, symmetric=symmetric, clip=clip,
                            embedding_bits=embeddings)
    data_spec = data or "rt:train"
    dataset = load_data(data_spec, labels=loaded.labels or None)
    if direct:
        subset = subsets(dataset, 1, min(1.0, calib_size / max(1, len(dataset))), seed)[0]
        result = direct_quantize(loaded, plan, torch_batches(subset, loaded.tokenizer, batch_size, max_length))
    else:
        if not loaded.labels:
            raise QbertEdgeError(f"{model}: QAT needs a classifier (a model with labels); use --direct for a bare encoder")
        result = qat_quantize(
            loaded, plan, dataset, epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
            seed=seed, max_steps=max_steps, group_by_length=group_by_length,
            distill=DistillConfig(distill_alpha, distill_temperature, distill_hidden) if distill else None,
        )
    result.meta["data"] = data_spec
    save_quantized(result, output)
    avg = plan.weight_bits(quantizable_shapes(result.model))
    how = result.meta["method"] + (f", distilled alpha {distill_alpha:g} T {distill_temperature:g}" if distill else "") + (
        f" hidden {distill_hidden:g}" if distill and distill_hidden else "")
    click.echo(f"wrote {output} ({how}, {len(plan.modules)} modules, {avg:.2f} bits/weight in the encoder)")
