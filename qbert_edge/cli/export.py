"""``qbert-edge export``: model.pt (or an fp32 BERT, the baseline) -> model.onnx, validated."""

from __future__ import annotations

import click

from qbert_edge.errors import QbertEdgeError


@click.command(name="export")
@click.argument("model_pt")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the ONNX model. [default: MODEL_PT with .onnx (.ort.onnx for --target ort)]")
@click.option("--target", type=click.Choice(["portable", "ort"]), default="portable", show_default=True,
              help="portable: packed codes + qbert_edge ops; ort: onnxruntime's MatMulNBits/GatherBlockQuantized.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset of the default domain (>= 17).")
@click.option("--no-validate", "no_validate", is_flag=True, help="Skip the comparison with the torch model.")
def command(model_pt, output, target, opset, no_validate) -> None:
    """Lower MODEL_PT to ONNX with packed low-bit weights.

    MODEL_PT is a quantized model.pt from `qbert-edge quantize`, or an fp32 model for the baseline
    (minilm, minilm-rt, a transformers directory). The export is checked with onnx.checker and,
    unless --no-validate, compared with the torch model on real sentences; nothing is written if
    either fails.

    \b
    Examples:
      qbert-edge export model.pt -o model.onnx
      qbert-edge export model.pt --target ort -o model.ort.onnx
      qbert-edge export minilm -o minilm-fp32.onnx
    """
    from qbert_edge.exporters.onnx_export import export_file

    if opset < 1:
        raise QbertEdgeError(f"--opset {opset} is not an opset version")
    result = export_file(model_pt, output, target=target, opset=opset, validate=not no_validate)
    click.echo(result.sizes.table())
    if result.validation is not None:
        click.echo(f"validation passed: {result.validation.summary()}")
    else:
        click.echo("validation skipped (--no-validate); onnx.checker passed")
    click.echo(
        f"wrote {result.output} ({result.target}, {result.bytes / 1e6:.2f} MB; "
        f"export {result.seconds_export:.1f}s, validation {result.seconds_validate:.1f}s)"
    )
