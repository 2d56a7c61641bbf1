"""Accuracy on the real-model corpus: each manifest's metric on eval/ against the float model,
for onnxruntime's quantize_static and ptqconv's settings, all calibrated on the same calib/
.bin files. Skips cleanly when there is no corpus."""

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
                except Exception as exc:  # the model was written but does not run
                    entry["error"] = f"run: {type(exc).__name__}: {exc}"[:200]
            else:
                entry["error"] = conv.error
            for path in out.parent.glob(out.name + "*"):
                path.unlink()
            row["variants"][label] = entry
        rows.append(row)
        ctx.log(f"  {m.name}: " + ", ".join(
            f"{k} {_cell(v, False)}" for k, v in row["variants"].items()))
    section.data = {"corpus": str(corpus), "models": rows}
    section.markdown = markdown(rows)
    return section


def _cell(entry: dict[str, Any], extra: bool = True) -> str:
    if "value" not in entry:
        return entry.get("error", "not run")
    value = entry["value"]
    text = "nan" if math.isnan(value) else f"{value:.4f}"
    return f"{text} ({entry['extra']})" if extra and entry.get("extra") else text


def markdown(rows: list[dict[str, Any]]) -> str:
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
    ])
