"""``qbert-edge allocate``: sensitivity.json -> plan.json (bits per module, by Hessian rank)."""

from __future__ import annotations

import click

from qbert_edge.errors import QbertEdgeError
from qbert_edge.plan import CLIPS

_BITS = click.IntRange(2, 8)


def _embedding_bits(value: str) -> int | None:
    if value.lower() in ("fp32", "none", "32"):
        return None
    try:
        b = int(value)
    except ValueError:
        raise QbertEdgeError(f"embedding bits {value!r}: expected 2..8 or fp32") from None
    if not 2 <= b <= 8:
        raise QbertEdgeError(f"embedding bits {b}: expected 2..8 or fp32")
    return b


@click.command(name="allocate")
@click.argument("sensitivity", type=click.Path(dir_okay=False))
@click.option("--scheme", required=True, help="B (uniform, e.g. 4) or lo/hi mixed precision (e.g. 2/3, 2/4).")
@click.option("--high-layers", type=click.IntRange(0), default=None, help="The K layers with the largest Omega get the high width.")
@click.option("--avg-bits", type=click.FloatRange(2, 8), default=None, help="As many high-width layers as keep the average bits per encoder weight <= X.")
@click.option("--budget-mb", type=click.FloatRange(0, min_open=True), default=None,
              help="As many high-width layers as keep the encoder-layer weights (packed codes + scales + zero points; 1 MB = 1e6 B) <= M.")
@click.option("--groups", type=click.IntRange(1), default=128, show_default=True, help="Groups of output rows per matrix.")
@click.option("--attention-bits", type=_BITS, default=None, help="Fix the bits of query/key/value/attention-output in every layer.")
@click.option("--ffn-bits", type=_BITS, default=None, help="Fix the bits of intermediate/output (feed-forward) in every layer.")
@click.option("--word-bits", default="8", show_default=True, help="Word embedding bits (2..8 or fp32).")
@click.option("--position-bits", default="8", show_default=True, help="Position embedding bits (2..8 or fp32).")
@click.option("--symmetric", is_flag=True, help="Symmetric ranges (zero point 2^(b-1)) instead of min/max.")
@click.option("--clip", type=click.Choice(CLIPS), default="minmax", show_default=True,
              help="Group ranges: min/max, or narrowed per group to the least squared error (mse; better at 2-3 bits).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write plan.json.")
def command(sensitivity, scheme, high_layers, avg_bits, budget_mb, groups, attention_bits, ffn_bits, word_bits,
            position_bits, symmetric, clip, output) -> None:
    """Bits per encoder layer from SENSITIVITY (a sensitivity.json from `qbert-edge analyze`) -> plan.json.

    \b
    Examples:
      qbert-edge allocate sensitivity.json --scheme 2/3 --high-layers 2 -o plan.json
      qbert-edge allocate sensitivity.json --scheme 2/4 --budget-mb 4.5 -o plan.json
      qbert-edge allocate sensitivity.json --scheme 2/4 --attention-bits 8 --avg-bits 3 -o plan.json
    """
    from qbert_edge.allocate import MB, allocate_bits, encoder_avg_bits, encoder_bytes
    from qbert_edge.sensitivity import Sensitivity

    sens = Sensitivity.load(sensitivity)
    plan = allocate_bits(
        sens, scheme, high_layers=high_layers, avg_bits=avg_bits, budget_mb=budget_mb, groups=groups,
        attention_bits=attention_bits, ffn_bits=ffn_bits, word_bits=_embedding_bits(word_bits),
        position_bits=_embedding_bits(position_bits), symmetric=symmetric, clip=clip, source=str(sensitivity),
    )
    plan.save(output)
    ranking = sens.ranking()
    bits = {}
    for name, q in plan.modules.items():
        if name.startswith("encoder.layer."):
            bits.setdefault(int(name.split(".")[2]), set()).add(q.bits)
    per_layer = ", ".join(f"L{i}:{'/'.join(str(b) for b in sorted(bits[i]))}" for i in ranking)
    click.echo(
        f"wrote {output}: scheme {plan.meta['scheme']}, layers by Omega {per_layer}; "
        f"encoder {encoder_bytes(plan) / MB:.3f} MB, {encoder_avg_bits(plan):.2f} bits/weight"
    )
