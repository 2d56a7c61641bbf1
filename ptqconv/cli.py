"""Command line: MindSpore Lite converter_lite flags, one-line errors, a summary at the end."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence

import click

from ptqconv.errors import PtqError

EPILOG = """\b
Examples:
  ptqconv --fmk=ONNX --modelFile=model.onnx --outputFile=model_int8.onnx \\
          --quantType=PostTraining --configFile=configs/digits.ini
  ptqconv --fmk=ONNX --modelFile=model.onnx --outputFile=model_w8.onnx \\
          --quantType=WeightQuant --bitNum=8
  ptqconv --modelFile=model.onnx --outputFile=model_w4.onnx --quantType=WeightQuant \\
          --bitNum=4 --quantWeightSize=1024 --quantWeightChannel=16

\b
Accuracy gate for CI: ptqconv benchmark --help
Exit status: 0 done, 1 the conversion failed (or missed --accuracyThreshold), 2 a flag or
the config is wrong.
"""


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.option(
    "--fmk", default="ONNX", show_default=True, metavar="ONNX", help="Source framework; only ONNX."
)
@click.option("--modelFile", "model_file", metavar="PATH", help="Float ONNX model to quantize.")
@click.option(
    "--outputFile",
    "output_file",
    metavar="PATH",
    help="Where to write the quantized ONNX model (weights above 2 GB go to PATH.data beside it).",
)
@click.option(
    "--quantType",
    "quant_type",
    metavar="TYPE",
    help="WeightQuant (weights only, 1-16 bits) or PostTraining (weights and "
    "activations, 1-8 bits, needs --configFile).",
)
@click.option(
    "--bitNum",
    "bit_num",
    metavar="N",
    help="Bits per weight: WeightQuant [1,16], PostTraining [1,8].  [default: 8]",
)
@click.option(
    "--quantWeightSize",
    "quant_weight_size",
    metavar="N",
    help="Quantize a weight only if it has more than N elements.  [default: 0]",
)
@click.option(
    "--quantWeightChannel",
    "quant_weight_channel",
    metavar="N",
    help="Quantize a Conv/ConvTranspose weight only if it has more than N output "
    "channels.  [default: 16]",
)
@click.option(
    "--configFile", "config_file", metavar="PATH", help="Calibration config (PostTraining)."
)
@click.option(
    "--skipQuantNode",
    "skip_quant_node",
    metavar="NAMES",
    help="Comma-separated node names or op types to keep in float.",
)
@click.option("--debugDir", "debug_dir", metavar="DIR",
              help="PostTraining: write a per-layer report (layer_report.csv/.json) of every "
                   "quantized tensor, float vs quantized, to DIR (config: "
                   "debug_info_save_path).")
@click.option("--sensitivity", is_flag=True,
              help="PostTraining: also quantize one node unit at a time and rank the units "
                   "by the output error each causes alone (slow: one model per unit); written "
                   "to DIR/sensitivity.csv with --debugDir.")
@click.option("--accuracyThreshold", "accuracy_threshold", metavar="PERCENT",
              help="Gate: after writing the model, compare it with the float model on the "
                   "config's eval_path samples and exit 1 if the mean bias (MindSpore's "
                   "benchmark formula, percent) is above PERCENT.")
@click.option("--cosineDistanceThreshold", "cosine_threshold", metavar="COS",
              help="Gate: also exit 1 if any output's cosine similarity is below COS.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--verbose", is_flag=True, help="Show tracebacks on errors.")
def convert_command(quiet: bool, verbose: bool, **flags: str | None) -> None:
    """Quantize a float ONNX model (post-training, no retraining needed)."""
    from ptqconv.convert import convert
    from ptqconv.options import ConvertOptions

    options = ConvertOptions.create(**flags)
    show = not quiet and sys.stderr.isatty()
    report = convert(options, progress=_progress if show else None)
    if not quiet:
        click.echo(report.format())
    if report.gate_failures:
        click.echo(f"ptqconv: error: accuracy gate failed: {'; '.join(report.gate_failures)} "
                   f"({options.output_file} was written)", err=True)
        raise click.exceptions.Exit(1)


def _progress(total: int, label: str) -> Callable[[int], None]:
    """A progress bar on stderr with rate and ETA, fed amounts of work done."""
    bar = click.progressbar(
        length=max(total, 1), label=label, file=sys.stderr, show_eta=True, show_percent=True
    )
    bar.__enter__()
    done = [0]

    def advance(amount: int) -> None:
        done[0] += amount
        bar.update(amount)
        if done[0] >= total:
            bar.__exit__(None, None, None)

    return advance


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the command and turn every failure into one line and an exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args
    command, prog = convert_command, "ptqconv"
    if args and args[0] == "benchmark":
        from ptqconv.benchmark import benchmark_command

        command, prog, args = benchmark_command, "ptqconv benchmark", args[1:]
    try:
        # With standalone_mode=False click returns a command's Exit code instead of raising.
        status = command.main(args=args, prog_name=prog, standalone_mode=False)
        return status if isinstance(status, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        return _fail(f"{exc.format_message()} (see {prog} --help)", 2, verbose)
    except PtqError as exc:
        return _fail(str(exc), exc.exit_code, verbose)
    except (KeyboardInterrupt, click.Abort):
        return _fail("interrupted", 130, verbose)
    except MemoryError:
        return _fail("out of memory", 1, verbose)
    except Exception as exc:
        return _fail(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)",
            1,
            verbose,
        )


def _fail(message: str, status: int, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    click.echo(f"ptqconv: error: {message}", err=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
