"""Accuracy on the real-model corpus: each manifest's metric on eval/ against the float model,
for onnxruntime's quantize_static and ptqconv's settings, all calibrated on the same calib/
.bin files; and the latency of every W8A8/W4A8 output against the float model, timed
together in one child. Skips cleanly when there is no corpus."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .common import Context, Section, fmt, guarded, run_child, table
from .corpus import CorpusModel, metric, models, outputs

BUILD_HINT = "build it with ../shared/corpus/build_corpus.sh DIR"

# (column, kind, method, bias correction, weight bits); activations are 8-bit throughout.
VARIANTS: tuple[tuple[str, str, str, bool, int], ...] = (
    ("onnxruntime W8A8 MinMax", "ort", "MinMax", False, 8),
    ("ptqconv W8A8 MAX_MIN", "ptq", "MAX_MIN", False, 8),
    ("ptqconv W8A8 KL", "ptq", "KL", False, 8),
    ("ptqconv W8A8 MSE+bias corr.", "ptq", "MSE", True, 8),
    ("ptqconv W4A8 MSE+bias corr.", "ptq", "MSE", True, 4),
    ("ptqconv WeightQuant 8-bit", "wq", "", False, 8),
    ("ptqconv WeightQuant 4-bit", "wq", "", False, 4),
)


# The outputs timed against float: full quantization, not WeightQuant.
TIMED = tuple(v[0] for v in VARIANTS if v[1] != "wq")
LATENCY_RUNS = 30


def _case(m: CorpusModel, variant: tuple[str, str, str, bool, int], out: Path,
          tmp: Path) -> tuple[str, dict[str, Any]]:
    """The bench.cases function of `variant` on `m` and its arguments."""
    _, kind, method, bias, bits = variant
    if kind == "ort":
        # onnxruntime as quantize_static is usually run: MinMax, no pre-processing.
        inputs = [{**x, "dir": str(m.dir / "calib" / x["dir"])} for x in m.inputs]
        return "ort_static", {"model": str(m.model), "out": str(out), "inputs": inputs,
                              "count": m.count("calib")}
    args = [f"--modelFile={m.model}", f"--outputFile={out}", "--quiet"]
    if kind == "wq":
        args += ["--quantType=WeightQuant", f"--bitNum={bits}"]
    else:
        config = m.ini_config(method, tmp / f"{m.name}_{method}_{bias}_{bits}.ini", bias, bits)
        args += ["--quantType=PostTraining", f"--configFile={config}"]
    return "ptqconv", {"args": args}


def run(ctx: Context) -> Section:
    section = Section("accuracy", "Accuracy on real models")
    if ctx.corpus is None or not Path(ctx.corpus).is_dir():
        where = "no corpus given (--corpus DIR or $PTQCONV_CORPUS)" if ctx.corpus is None \
            else f"corpus {ctx.corpus} not found"
        message = f"{where}; {BUILD_HINT}; skipping accuracy"
        print(message, flush=True)
        section.markdown = f"Skipped: {message}."
        section.data = {"skipped": message}
        return section
    corpus = Path(ctx.corpus)
    found = models(corpus)
    if ctx.quick:  # the two smallest, for the plumbing
        found = [m for m in found if m.name in ("mtcnn_rnet", "mtcnn_pnet")] or found[:1]
    tmp = ctx.scratch("accuracy")
    rows: list[dict[str, Any]] = []
    for m in found:
        ctx.log(f"accuracy: {m.name}")
        row: dict[str, Any] = {"model": m.name, "calib": m.count("calib"),
                               "eval": m.count("eval"), "variants": {}}
        try:
            ref = outputs(m.model, m)
            row["metric"], row["float"], _ = metric(m, ref, ref)
        except Exception as exc:
            row["error"] = f"float model: {type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            continue
        timed = {"float": str(m.model)}
        for variant in VARIANTS:
            label = variant[0]
            out = tmp / f"{m.name}_{label.replace(' ', '_')}.onnx"
            child = _case(m, variant, out, tmp)
            conv = guarded(ctx, f"{m.name}, {label}", lambda c=child: run_child(
                *c, 1, ctx.mem_cap_gb))
            entry: dict[str, Any] = {"convert_seconds": conv.seconds if conv.ok else None,
                                     "convert_rss_mb": conv.rss_mb if conv.ok else None}
            if conv.ok:
                try:
                    _, value, extra = metric(m, ref, outputs(out, m))
                    entry.update(value=value, extra=extra)
                    if label in TIMED:
                        timed[label] = str(out)
                except Exception as exc:  # the model was written but does not run
                    entry["error"] = f"run: {type(exc).__name__}: {exc}"[:200]
            else:
                entry["error"] = conv.error
            row["variants"][label] = entry
        # One thread too: on a loaded machine two-thread times are bimodal (a kernel waits
        # for the second core), one-thread ones stay within a few percent.
        args = {"models": timed, "sample": m.sample_files("eval", 0),
                "threads": sorted({ctx.threads, 1}, reverse=True),
                "runs": 5 if ctx.quick else LATENCY_RUNS}
        lat = guarded(ctx, f"{m.name}, latency", lambda a=args: run_child(
            "latency_vs_float", a, 1, ctx.mem_cap_gb))
        row["latency"] = lat.result if lat.ok else {"error": lat.error}
        for path in tmp.glob(f"{m.name}_*"):
            path.unlink()
        rows.append(row)
        ctx.log(f"  {m.name}: " + ", ".join(
            f"{k} {_cell(v, False)}" for k, v in row["variants"].items()))
        ctx.log(f"  {m.name} latency x float: " + ", ".join(
            f"{k} {_latency_cell(row['latency'], k)}" for k in TIMED))
    runs = 5 if ctx.quick else LATENCY_RUNS
    section.data = {"corpus": str(corpus), "models": rows, "latency_runs": runs}
    section.markdown = markdown(rows, runs, tuple(sorted({ctx.threads, 1}, reverse=True)))
    return section


def _cell(entry: dict[str, Any], extra: bool = True) -> str:
    if "value" not in entry:
        return entry.get("error", "not run")
    value = entry["value"]
    text = "nan" if math.isnan(value) else f"{value:.4f}"
    return f"{text} ({entry['extra']})" if extra and entry.get("extra") else text


def _latency_cell(latency: dict[str, Any], label: str, share: bool = False) -> str:
    """x float at each thread count, most threads first ("0.62 / 0.60"), and the share."""
    if "error" in latency:
        return latency["error"]
    entry, floor = latency.get(label), latency.get("float")
    if entry is None or floor is None:
        return "–"
    text = " / ".join(f"{entry['ms'][n] / floor['ms'][n]:.2f}" for n in floor["ms"])
    fraction = entry.get("integer_share")
    if share and fraction is not None:
        text += f" ({fraction:.0%} int)"
    return text


def markdown(rows: list[dict[str, Any]], runs: int = LATENCY_RUNS,
             thread_counts: tuple[int, ...] = (2, 1)) -> str:
    threads = " / ".join(f"{n} thread{'s' if n > 1 else ''}" for n in thread_counts)
    labels = [v[0] for v in VARIANTS]
    metric_rows, time_rows = [], []
    for r in rows:
        if "error" in r:
            metric_rows.append([r["model"], r["error"], "–", *["–"] * len(labels)])
            continue
        metric_rows.append([r["model"], r["metric"], fmt(r["float"], 4),
                            *[_cell(r["variants"].get(x, {})) for x in labels]])
        time_rows.append([r["model"], r["calib"], *[
            fmt(r["variants"].get(x, {}).get("convert_seconds"), 1) for x in labels]])
    latency_rows = [[r["model"], " / ".join(
        fmt(ms, 2) for ms in r["latency"].get("float", {}).get("ms", {}).values()) or "–",
                     *[_latency_cell(r["latency"], x, share=True) for x in TIMED]]
                    for r in rows if "latency" in r]
    return "\n".join([
        "Each manifest's metric on its eval split against the float model's outputs (1.0 is "
        "the float model where the metric compares with float; accuracy-type metrics compare "
        "with labels). Both tools calibrate on the same `calib/` `.bin` files. onnxruntime: "
        "`quantize_static` as usually run (QDQ, per-channel int8 weights, uint8 activations, "
        "MinMax, no pre-processing). ptqconv: its defaults (reduce_range, SmoothQuant) with "
        "each calibration method; W4A8 is `bit_num=4` with `activation_bit_num=8`. "
        "WeightQuant models run with "
        "onnxruntime's default session options (MatMulNBits quantizes activations to int8 "
        "at accuracy level 4).",
        "",
        table(["model", "metric (vs float)", "float", *labels], metric_rows, left=2),
        "",
        "Conversion time (s; one run each, in its own process, imports included):",
        "",
        table(["model", "calib samples", *labels], time_rows),
        "",
        f"Latency against the float model (x float with {threads}; median of {runs} runs "
        "of the first eval sample, every model of a row timed in one process, interleaved, "
        "default session options: all graph optimizations) and the share of the "
        "Conv/MatMul/Gemm multiply-accumulates that run in integer kernels:",
        "",
        table(["model", "float (ms)", *TIMED], latency_rows),
    ])
