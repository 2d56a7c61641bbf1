"""Command line: MindSpore Lite converter_lite and benchmark flags, one-line errors, a summary.

The only module that knows click: `ptqconv [convert] FLAGS` converts, `ptqconv benchmark FLAGS`
checks a quantized model against its float model.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

from ptqconv import __version__, runtime
from ptqconv.errors import PtqError, PtqUsageError, escaped, shown

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
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
Exit status: 0 done (PostTraining keeps units float until the accuracy gate passes), 1 the
conversion failed (or WeightQuant / DynamicQuant missed the gate), 2 a flag or the config is
wrong, 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM).
"""
# Without a terminal (CI logs), one plain progress line at most this often.
PLAIN_PROGRESS_SECONDS = 5.0
# Signals that stop a run the way Ctrl-C does: temporary files removed, nothing half-written.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """Raised by the handler of a stop signal (a BaseException, like KeyboardInterrupt, so
    no `except Exception` swallows it, while every `finally` and `with` still runs)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum



def _stoppable(command: Callable[..., None]) -> Callable[..., None]:
    """A KeyboardInterrupt that did not come through the signal handler (raised before it
    was installed, or by a library) stops the command as Ctrl-C does; click would otherwise
    print a blank line of its own before the error."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Stopped(signal.SIGINT) from None

    return run


# converter_lite and benchmark flags that have no meaning for an ONNX-to-ONNX converter on
# onnxruntime's CPU provider, and why.
FOREIGN_FLAGS = {
    "--weightFile": "it is the weight file of Caffe models; ptqconv reads ONNX",
    "--saveType": "ptqconv writes ONNX, not MindSpore's model formats",
    "--optimize": "it picks MindSpore's backend optimizations; onnxruntime optimizes at load",
    "--decryptKey": "MindIR encryption has no ONNX counterpart",
    "--decryptMode": "MindIR encryption has no ONNX counterpart",
    "--encryptKey": "MindIR encryption has no ONNX counterpart",
    "--encryption": "MindIR encryption has no ONNX counterpart",
    "--inputDataType": "ptqconv keeps the model's input types",
    "--outputDataType": "ptqconv keeps the model's output types",
    "--outputDataFormat": "ptqconv keeps the model's output layout",
    "--infer": "run ptqconv benchmark on the written model instead",
    "--cpuBindMode": "onnxruntime does not bind cores",
    "--device": "ptqconv benchmark runs onnxruntime's CPU provider",
    "--enableFp16": "onnxruntime's CPU provider has no float16 mode",
    "--timeProfiling": "use onnxruntime's profiler",
    "--perfProfiling": "use onnxruntime's profiler",
    "--perfEvent": "use onnxruntime's profiler",
    "--benchmarkDataType": "outputs are compared in the model's output types",
    "--cryptoLibPath": "MindIR encryption has no ONNX counterpart",
}


def _refuse_empty(flags: dict[str, Any]) -> None:
    """`--flag=` with nothing after it (an unset CI variable) is an error, never the flag
    left out: `--accuracyThreshold=$THRESHOLD` must not turn the gate off unseen."""
    params = {p.name: p for p in click.get_current_context().command.params}
    options = {opt for p in params.values() for opt in p.opts}
    for name, value in flags.items():
        if not isinstance(value, str):
            continue
        flag = params[name].opts[0] if name in params else name
        if not value.strip():
            raise PtqUsageError(f"{flag}: empty value; give one, or leave the flag out")
        if value.split("=", 1)[0] in options:
            # `--debugDir --quiet`: the next flag was taken for the value.
            raise PtqUsageError(f"{flag}: its value {value!r} is another flag; give the value "
                                f"as {flag}=VALUE")


def _refuse_repeated(args: Sequence[str]) -> None:
    """A flag given twice is an error, as a key given twice in a config is: which one was
    meant is not for ptqconv to guess (click would keep the last)."""
    seen: dict[str, str] = {}
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("--") or arg in ("--help", "--version"):
            continue
        name = arg.split("=", 1)[0]
        if name in seen:
            raise PtqUsageError(f"{name} given twice ({seen[name]} and {arg}); give it once")
        seen[name] = arg


class _ConvertByDefault(click.Group):
    """`ptqconv FLAGS` is `ptqconv convert FLAGS`, as converter_lite users type it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:  # `ptqconv` alone: how to use it, not "--quantType is required"
            args = ["convert", "--help"]
        elif args[0] not in self.commands and args[0] != "--version":
            args = ["convert", *args]
        _refuse_repeated(args[1:])
        return super().parse_args(ctx, args)


@click.group(cls=_ConvertByDefault, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="ptqconv")
def ptqconv() -> None:
    """Post-training quantization of ONNX models with MindSpore Lite's converter flags."""


@ptqconv.command(
    name="convert",
    context_settings=CONTEXT,
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
    help="WeightQuant (weights only, 1-16 bits), PostTraining (weights and "
    "activations, 1-8 bits, needs --configFile) or DynamicQuant (int8 weights, activations "
    "quantized at run time).",
)
@click.option(
    "--bitNum",
    "bit_num",
    metavar="N",
    help="Bits per weight: WeightQuant [0,16] (0: mixed bit, per layer; 1-4: MatMul/Gemm "
         "weights in blocks of 32 and embedding tables in 8 bits unless block_size is set), "
         "PostTraining [1,8].  [default: 8]",
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
    "--inputShape",
    "input_shape",
    metavar="SHAPES",
    help="Shapes of inputs with dynamic dimensions, name:1,3,224,224;name2:1,64 (wins over "
    "input_shape in the config).",
)
@click.option(
    "--skipQuantNode",
    "skip_quant_node",
    metavar="NAMES",
    help="Comma-separated node names or op types to keep in float.",
)
@click.option(
    "--inputDataFormat",
    "input_data_format",
    metavar="NHWC|NCHW",
    help="Layout of 4-D .bin samples (calibration and eval data); they are transposed to "
    "the model's layout.  [default: the model's layout]",
)
@click.option(
    "--fp16",
    "fp16",
    metavar="on|off",
    help="Store the float32 constants that stay float in float16 (as converter_lite "
    "does); inputs, outputs and the arithmetic stay as they are.  [default: off; a model "
    "that stores its float constants in float16 gets those stored so again]",
)
@click.option("--debugDir", "debug_dir", metavar="DIR",
              help="PostTraining: write a per-layer report (layer_report.csv/.json) of every "
                   "quantized tensor, float vs quantized, to DIR (config: "
                   "debug_info_save_path).")
@click.option("--sensitivity", is_flag=True,
              help="PostTraining: also quantize one node unit at a time and rank the units "
                   "by the output error each causes alone (slow: one model per unit); written "
                   "to DIR/sensitivity.csv with --debugDir.")
@click.option("--encodingsFile", "encodings_file", metavar="PATH",
              help="PostTraining: also write every quantized tensor's scale, offset, bit width "
                   "and symmetry to PATH as AIMET / QNN encodings (JSON, version 0.6.1).")
@click.option("--accuracyThreshold", "accuracy_threshold", metavar="PERCENT",
              help="Gate: after writing the model, compare it with the float model on the "
                   "config's eval_path samples and exit 1 if the mean bias (MindSpore's "
                   "benchmark formula, percent) is above PERCENT.")
@click.option("--cosineDistanceThreshold", "cosine_threshold", metavar="COS",
              help="Gate: also exit 1 if any output's cosine similarity is below COS.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--verbose", is_flag=True,
              help="Show tracebacks on errors, and each per-node decision as it is made.")
@_stoppable
def convert_command(quiet: bool, verbose: bool, **flags: Any) -> None:
    """Quantize a float ONNX model (post-training, no retraining needed)."""
    from ptqconv.conversion import convert
    from ptqconv.settings import ConvertSettings

    _refuse_empty(flags)
    settings = ConvertSettings.create(**flags)
    with _Progress.shown(quiet) as progress:
        report = convert(settings, progress=progress)
    for path in report.replaced:
        click.echo(f"ptqconv: warning: replaced the existing {shown(path)}, which this run did "
                   "not write (the new model's weights are stored there)", err=True)
    if not quiet:
        click.echo(report.format())
    if report.gate_failures:
        click.echo(f"ptqconv: error: accuracy gate failed: {'; '.join(report.gate_failures)} "
                   f"({settings.output_file} was written)", err=True)
        raise click.exceptions.Exit(1)


BENCHMARK_EPILOG = """\b
Examples:
  ptqconv benchmark --modelFile=model_int8.onnx --referenceModel=model.onnx \\
          --inDataDir=input:eval/input --reportFile=report.json
  ptqconv benchmark --modelFile=model_int8.onnx --inDataFile=sample.bin \\
          --benchmarkDataFile=sample.out --accuracyThreshold=1

\b
Benchmark data file (MindSpore's format), for every output:
  name ndims d0 ... dn-1
  v0 v1 v2 ...

\b
Exit status: 0 the gate passed, 1 it failed (or a model could not run), 2 a flag or an input
file is wrong.
"""


@ptqconv.command(
    name="benchmark",
    context_settings=CONTEXT,
    epilog=BENCHMARK_EPILOG,
)
@click.option("--modelFile", "model_file", metavar="PATH", help="Quantized ONNX model to check.")
@click.option(
    "--referenceModel",
    "reference_model",
    metavar="PATH",
    help="Float ONNX model run on the same inputs (or give --benchmarkDataFile).",
)
@click.option(
    "--inDataDir",
    "in_data_dir",
    metavar="DIRS",
    help="Input samples as .bin files (or images, see --configFile), one directory per input: "
    "name:dir[,name:dir...] or dir[,dir...] in input order (like calibrate_path / "
    "image_path). All files are used. Without --inDataDir and --inDataFile the inputs are "
    "random: latency only, no accuracy verdict.",
)
@click.option(
    "--inDataFile",
    "in_data_file",
    metavar="FILES",
    help="One sample: one .bin file per model input, comma-separated, in input order.",
)
@click.option(
    "--benchmarkDataFile",
    "benchmark_data_file",
    metavar="PATH",
    help="Reference outputs of the --inDataFile sample, in MindSpore's benchmark data format "
    "(instead of --referenceModel).",
)
@click.option(
    "--inputShape",
    "input_shape",
    metavar="SHAPES",
    help="Shapes of dynamic inputs: name:d0,d1,...[;name2:...].",
)
@click.option(
    "--inputShapes",
    "input_shapes",
    metavar="SHAPES",
    help="MindSpore's spelling: d0,d1,...[:d0,d1,...], one shape per input in input order.",
)
@click.option(
    "--inputDataFormat",
    "input_data_format",
    metavar="NHWC|NCHW",
    help="Layout of 4-D .bin samples; transposed to the model's.  [default: the model's]",
)
@click.option(
    "--configFile",
    "config_file",
    metavar="PATH",
    help="A converter config whose [data_preprocess_param] input_type=IMAGE and image keys "
    "say how to read --inDataDir / --inDataFile images.",
)
@click.option(
    "--accuracyThreshold",
    "accuracy_threshold",
    metavar="PERCENT",
    help="Fail when the model's mean bias (MindSpore's formula, percent) is above PERCENT.  "
    "[default: 0.5]",
)
@click.option(
    "--cosineDistanceThreshold",
    "cosine_distance_threshold",
    metavar="COS",
    help="Also fail when any output's cosine similarity is below COS.  [default: off]",
)
@click.option("--reportFile", "report_file", metavar="PATH", help="Write a JSON report to PATH.")
@click.option(
    "--graphOptimizationLevel",
    "graph_optimization_level",
    metavar="LEVEL",
    help="onnxruntime graph optimizations for both models: disable, basic, extended or all.  "
    "[default: all]",
)
@click.option("--numThreads", "num_threads", metavar="N", help="Threads per session.  [default: 2]")
@click.option(
    "--loopCount",
    "loop_count",
    metavar="N",
    help="Latency: timed runs of each model on the first sample.  [default: 10]",
)
@click.option(
    "--warmUpLoopCount",
    "warm_up_loop_count",
    metavar="N",
    help="Latency: untimed runs before timing.  [default: 3]",
)
@click.option("--quiet", is_flag=True, help="Print nothing but errors; the exit status tells.")
@click.option("--verbose", is_flag=True, help="Show tracebacks on errors.")
@_stoppable
def benchmark_command(quiet: bool, verbose: bool, **flags: Any) -> None:
    """Check a quantized model's accuracy against its float model (MindSpore benchmark flags)."""
    from ptqconv.evaluate import BenchmarkSettings, benchmark

    _refuse_empty(flags)
    advance: list[Callable[[int], None]] = []
    with _Progress.shown(quiet) as progress:

        def on_start(total: int) -> None:
            if progress is not None and total > 1:
                advance.append(progress(total, "comparing"))

        report = benchmark(BenchmarkSettings.create(**flags),
                           progress=lambda amount: advance and advance[0](amount),
                           on_start=on_start)
    if not quiet:
        click.echo(report.format())
    if not report.passed:
        raise click.exceptions.Exit(1)


class _Progress:
    """Progress on stderr: a bar with rate and ETA on a terminal; otherwise (CI logs) a plain
    line every PLAIN_PROGRESS_SECONDS, so a long run is never silent for minutes."""

    def __init__(self) -> None:
        self.interactive = sys.stderr.isatty()
        self.bars: list[Any] = []

    @classmethod
    @contextlib.contextmanager
    def shown(cls, quiet: bool) -> Iterator[Callable[[int, str], Callable[[int], None]] | None]:
        """A progress factory (None with --quiet); bars left open by an interruption are
        closed on the way out, which shows the terminal's cursor again."""
        if quiet:
            yield None
            return
        progress = cls()
        try:
            yield progress
        finally:
            for bar in progress.bars:
                bar.render_finish()

    def __call__(self, total: int, label: str) -> Callable[[int], None]:
        """A callback fed amounts of work done, out of `total`."""
        return self._bar(total, label) if self.interactive else self._plain(total, label)

    def _bar(self, total: int, label: str) -> Callable[[int], None]:
        bar = click.progressbar(
            length=max(total, 1), label=label, file=sys.stderr, show_eta=True,
            show_percent=True)
        bar.__enter__()
        self.bars.append(bar)
        done = [0]

        def advance(amount: int) -> None:
            done[0] += amount
            bar.update(amount)
            if done[0] >= total:
                self.bars.remove(bar)
                bar.__exit__(None, None, None)

        return advance

    @staticmethod
    def _plain(total: int, label: str) -> Callable[[int], None]:
        start = last = time.monotonic()
        done = 0

        def advance(amount: int) -> None:
            nonlocal done, last
            done += amount
            now = time.monotonic()
            if now - last >= PLAIN_PROGRESS_SECONDS:
                last = now
                click.echo(f"ptqconv: {label}: {100 * done / max(total, 1):.0f}% "
                           f"({done} of {total}), {now - start:.0f} s", err=True)

        return advance


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the command and turn every failure into one line and an exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args
    runtime.give_back_big_allocations()  # the process is ptqconv's: its memory policy too
    # The modules imported so far live as long as the process: frozen, the full collections
    # that free each step's model skip them (docs/decisions.md, start-up cost).
    gc.freeze()
    try:
        with _signals_handled(), _decisions_logged(verbose):
            return _run(args, verbose)
    finally:
        gc.unfreeze()


def _on_stop_signal(signum: int, frame: object) -> None:
    # The cleanup this starts must not be cut short by a second signal.
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def _signals_handled() -> Iterator[None]:
    """SIGTERM (a CI cancel) and SIGHUP stop a run exactly as Ctrl-C does; SIGXFSZ is
    ignored, so passing the file size limit is a write error that names the file instead of
    a silent kill."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = {sig: signal.getsignal(sig) for sig in (*STOP_SIGNALS, signal.SIGXFSZ)}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in handled.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _decisions_logged(verbose: bool) -> Iterator[None]:
    """With --verbose, ptqconv's own per-node decisions on stderr (not its libraries')."""
    if not verbose:
        yield
        return
    logger = logging.getLogger("ptqconv")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run(args: list[str], verbose: bool) -> int:
    try:
        # With standalone_mode=False click returns a command's Exit code instead of raising.
        status = ptqconv.main(args=args, prog_name="ptqconv", standalone_mode=False)
        return status if isinstance(status, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.NoSuchOption as exc:
        command = exc.ctx.command.name if exc.ctx is not None else None
        prog = "ptqconv benchmark" if command == "benchmark" else "ptqconv"
        why = FOREIGN_FLAGS.get(exc.option_name)
        if why is None:
            return _fail(f"{exc.format_message()} (see {prog} --help)", 2, verbose)
        return _fail(f"{exc.option_name} (MindSpore's) has no meaning here: {why}", 2, verbose)
    except click.UsageError as exc:
        command = exc.ctx.command.name if exc.ctx is not None else None
        prog = ("ptqconv benchmark" if command == "benchmark" or args[:1] == ["benchmark"]
                else "ptqconv")
        return _fail(f"{exc.format_message()} (see {prog} --help)", 2, verbose)
    except PtqError as exc:
        return _fail(str(exc), exc.exit_code, verbose)
    except Stopped as exc:
        name = signal.Signals(exc.signum).name
        return _fail("interrupted" if exc.signum == signal.SIGINT else f"terminated by {name}",
                     128 + exc.signum, verbose)
    except (KeyboardInterrupt, click.Abort):
        return _fail("interrupted", 128 + signal.SIGINT, verbose)
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
    click.echo(f"ptqconv: error: {escaped(message)}", err=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
