"""The ``qbert-edge`` command line: thin click commands that load, call and save.

Each command lives in its own module and imports its heavy code (torch, onnx) inside the
command, so ``qbert-edge --help`` and the device-side commands start fast without torch.
A :class:`~qbert_edge.errors.QbertEdgeError` becomes ``qbert-edge: error: ...`` and exit 2.
"""

from __future__ import annotations

import logging
import sys

import click

from qbert_edge import __version__
from qbert_edge.errors import QbertEdgeError

COMMANDS = {
    # name: (module, one-line help shown by `qbert-edge --help`)
    "analyze": ("qbert_edge.cli.analyze", "Hessian sensitivity of each encoder layer -> sensitivity.json."),
    "allocate": ("qbert_edge.cli.allocate", "Bits per layer from the sensitivity -> plan.json."),
    "quantize": ("qbert_edge.cli.quantize", "Quantize a model with a plan (QAT or --direct) -> model.pt."),
    "export": ("qbert_edge.cli.export", "Lower a quantized model.pt to ONNX with packed low-bit weights."),
    "run": ("qbert_edge.cli.run", "Classify texts with an exported model.onnx (no torch needed)."),
    "eval": ("qbert_edge.cli.eval", "Accuracy and macro-F1 of a model on a labelled data set."),
    "measure": ("qbert_edge.cli.measure", "Latency and DRAM footprint of a model.onnx, in a fresh process."),
    "compare": ("qbert_edge.cli.compare", "Per-head attention KL divergence between two models."),
    "demo": ("qbert_edge.cli.demo", "The whole pipeline on the reference model, end to end."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, short_help = COMMANDS[name]
        try:
            module = __import__(module_name, fromlist=["command"])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("qbert_edge.cli."):
                return _not_yet(name, short_help)
            raise
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _not_yet(name: str, short_help: str) -> click.Command:
    @click.command(name=name, help=short_help + "\n\nNot built yet in this version.")
    def stub() -> None:
        raise QbertEdgeError(f"'{name}' is not available in qbert-edge {__version__} yet")

    return stub


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qbert-edge")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """qbert-edge: Hessian-guided ultra-low-precision BERT for small devices.

    \b
    A typical run:
      qbert-edge analyze minilm-rt --data rt:train -o sensitivity.json --plot sens.png
      qbert-edge allocate sensitivity.json --scheme 2/3 --high-layers 2 -o plan.json
      qbert-edge quantize minilm-rt --plan plan.json --data rt:train -o model.pt
      qbert-edge export model.pt -o model.onnx
      qbert-edge run model.onnx --text "a gripping, funny film"
      qbert-edge measure model.onnx --json
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script: user errors become one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="qbert-edge", standalone_mode=False)
    except QbertEdgeError as exc:
        click.echo(f"qbert-edge: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("qbert-edge: interrupted; no output was written", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("qbert-edge: interrupted; no output was written", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
