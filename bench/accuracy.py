"""Accuracy on the real-model corpus: each manifest's metric on eval/ against the float model,
for onnxruntime's quantize_static, NNCF's `nncf.quantize` (when installed: `pip install
-e '.[bench]'`) and ptqconv, its default (AUTO) and each forced setting, all calibrated on the
same calib/ .bin files; and the latency of every W8A8/W4A8 output against the float model,
timed together in one child. Every table names the CPU it was measured on (integer kernels,
hence what ptqconv's latency plan keeps float, depend on AVX2 and VNNI). Skips cleanly when
there is no corpus."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np

from .common import Context, Section, fmt, guarded, run_child, table
from .corpus import CorpusModel, Outputs, metric, models, outputs

BUILD_HINT = "build it with ../shared/corpus/build_corpus.sh DIR"

ORT = "onnxruntime W8A8 MinMax"
NNCF = "NNCF W8A8 default"
AUTO = "ptqconv W8A8 AUTO (default)"
MSE_BC = "ptqconv W8A8 MSE+bias corr."

# (column, kind, method, bias correction, weight bits); activations are 8-bit throughout.
VARIANTS: tuple[tuple[str, str, str, bool, int], ...] = (
    (ORT, "ort", "MinMax", False, 8),
    (NNCF, "nncf", "", False, 8),
    (AUTO, "auto", "", False, 8),
    ("ptqconv W8A8 MAX_MIN", "ptq", "MAX_MIN", False, 8),
    ("ptqconv W8A8 KL", "ptq", "KL", False, 8),
    (MSE_BC, "ptq", "MSE", True, 8),
    ("ptqconv W4A8 MSE+bias corr.", "ptq", "MSE", True, 4),
    ("ptqconv WeightQuant 8-bit", "wq", "", False, 8),
    ("ptqconv WeightQuant 4-bit", "wq", "", False, 4),
    ("onnxruntime WeightQuant 4-bit (MatMulNBitsQuantizer)", "ortw", "", False, 4),
)
WEIGHT_ONLY = ("wq", "ortw")


# The outputs timed against float: full quantization, not WeightQuant.
TIMED = tuple(v[0] for v in VARIANTS if v[1] not in WEIGHT_ONLY)
LATENCY_RUNS = 30
NOT_INSTALLED = "not installed"


def nncf_version() -> str | None:
    """NNCF's version when it is importable here (the children run the same Python)."""
    if importlib.util.find_spec("nncf") is None:
        return None
    try:
        return importlib.metadata.version("nncf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def is_transformer(model: Any) -> bool:
    """Whether NNCF should get `model_type=TRANSFORMER`: MatMuls and no Conv, or attention
    with layer norms (Softmax and LayerNormalization). Decided from the op types alone, of
    the main graph and every If/Loop/Scan body; `model` is a ModelProto or a path."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    ops: set[str] = set()
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    convs = {"Conv", "ConvInteger", "QLinearConv", "ConvTranspose"}
    return ("MatMul" in ops and not ops & convs) or {"Softmax", "LayerNormalization"} <= ops


def output_cosine(ref: Outputs, got: Outputs) -> float:
    """Cosine of each float output against its quantized one, averaged over every output of
    every eval sample: the same figure for every model, whatever its manifest's metric."""
    values = []
    for r, g in zip(ref, got, strict=True):
        for a, b in zip(r, g, strict=True):
            a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
            values.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return float(np.mean(values))


def _case(m: CorpusModel, variant: tuple[str, str, str, bool, int], out: Path,
          tmp: Path) -> tuple[str, dict[str, Any]]:
    """The bench.cases function of `variant` on `m` and its arguments."""
    _, kind, method, bias, bits = variant
    if kind == "ortw":  # its defaults: 4-bit blocks of 128 for MatMul weights
        return "ort_nbits", {"src": str(m.model), "out": str(out), "external": False}
    if kind in ("ort", "nncf"):
        inputs = [{**x, "dir": str(m.dir / "calib" / x["dir"])} for x in m.inputs]
        common = {"model": str(m.model), "out": str(out), "inputs": inputs,
                  "count": m.count("calib")}
        if kind == "nncf":
            return "nncf_quantize", {**common, "transformer": is_transformer(m.model)}
        # onnxruntime as quantize_static is usually run: MinMax, no pre-processing.
        return "ort_static", common
    args = [f"--modelFile={m.model}", f"--outputFile={out}", "--quiet"]
    if kind == "wq":
        args += ["--quantType=WeightQuant", f"--bitNum={bits}"]
    elif kind == "auto":
        config = m.auto_config(tmp / f"{m.name}_auto.ini")
        args += ["--quantType=PostTraining", f"--configFile={config}"]
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
    from ptqconv.runtime import cpu_description

    cpu, nncf = cpu_description(), nncf_version()
    ctx.log(f"accuracy on {cpu}; NNCF {nncf or NOT_INSTALLED}")
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
        row["transformer"] = is_transformer(m.model)
        timed = {"float": str(m.model)}
        for variant in VARIANTS:
            label = variant[0]
            out = tmp / f"{m.name}_{''.join(c if c.isalnum() else '_' for c in label)}.onnx"
            if variant[1] == "nncf" and nncf is None:
                row["variants"][label] = {"error": NOT_INSTALLED}
                continue
            child = _case(m, variant, out, tmp)
            conv = guarded(ctx, f"{m.name}, {label}", lambda c=child: run_child(
                *c, 1, ctx.mem_cap_gb))
            entry: dict[str, Any] = {"convert_seconds": conv.seconds if conv.ok else None,
                                     "convert_rss_mb": conv.rss_mb if conv.ok else None}
            if conv.ok:
                try:
                    got = outputs(out, m)
                    _, value, extra = metric(m, ref, got)
                    entry.update(value=value, extra=extra, cosine=output_cosine(ref, got))
                    if variant[1] in WEIGHT_ONLY:  # what a weight-only tool is for
                        entry["size_ratio"] = _files_size(out) / _files_size(m.model)
                    if isinstance(conv.result, dict):
                        entry["child"] = conv.result
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
            f"{k} {_latency_cell(row['latency'], k)}" for k in TIMED if k in timed))
    runs = 5 if ctx.quick else LATENCY_RUNS
    section.title = f"Accuracy on real models ({cpu})"
    section.data = {"corpus": str(corpus), "cpu": cpu, "nncf": nncf, "models": rows,
                    "latency_runs": runs}
    section.markdown = markdown(rows, runs, tuple(sorted({ctx.threads, 1}, reverse=True)),
                                cpu, nncf)
    return section


def _cell(entry: dict[str, Any], extra: bool = True) -> str:
    if "value" not in entry:
        return entry.get("error", "not run")
    value = entry["value"]
    text = "nan" if math.isnan(value) else f"{value:.4f}"
    notes = [entry["extra"]] if entry.get("extra") else []
    if "size_ratio" in entry:
        notes.append(f"{entry['size_ratio']:.3f} of the size")
    return f"{text} ({'; '.join(notes)})" if extra and notes else text


def _files_size(model: Path) -> int:
    """Bytes of a model file and of its external data beside it."""
    return sum(p.stat().st_size for p in model.parent.glob(f"{model.name}*"))


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


def _cosine_cell(entry: dict[str, Any]) -> str:
    if "cosine" not in entry:
        return entry.get("error", "not run")
    return f"{entry['cosine']:.4f}"


def auto_verdict(row: dict[str, Any]) -> str:
    """Whether AUTO's output cosine is at least the best peer's (onnxruntime, NNCF)."""
    auto = row["variants"].get(AUTO, {}).get("cosine")
    peers = [row["variants"].get(x, {}).get("cosine") for x in (ORT, NNCF)]
    peers = [p for p in peers if p is not None]
    if auto is None or not peers:
        return "–"
    # Four decimals are what the table shows: a tie there is a tie.
    best = max(peers)
    return "yes" if round(auto, 4) >= round(best, 4) else f"no ({auto - best:+.4f})"


def markdown(rows: list[dict[str, Any]], runs: int = LATENCY_RUNS,
             thread_counts: tuple[int, ...] = (2, 1), cpu: str = "unknown CPU",
             nncf: str | None = None) -> str:
    threads = " / ".join(f"{n} thread{'s' if n > 1 else ''}" for n in thread_counts)
    labels = [v[0] for v in VARIANTS]
    cosine_labels = [v[0] for v in VARIANTS if v[1] not in WEIGHT_ONLY]
    metric_rows, time_rows, cosine_rows = [], [], []
    for r in rows:
        if "error" in r:
            metric_rows.append([r["model"], r["error"], "–", *["–"] * len(labels)])
            continue
        metric_rows.append([r["model"], r["metric"], fmt(r["float"], 4),
                            *[_cell(r["variants"].get(x, {})) for x in labels]])
        cosine_rows.append([r["model"], "yes" if r.get("transformer") else "no",
                            *[_cosine_cell(r["variants"].get(x, {})) for x in cosine_labels],
                            auto_verdict(r)])
        time_rows.append([r["model"], r["calib"], *[
            fmt(r["variants"].get(x, {}).get("convert_seconds"), 1) for x in labels]])
    latency_rows = [[r["model"], " / ".join(
        fmt(ms, 2) for ms in r["latency"].get("float", {}).get("ms", {}).values()) or "–",
                     *[_latency_cell(r["latency"], x, share=True) for x in TIMED]]
                    for r in rows if "latency" in r]
    on = f"on {cpu}"
    return "\n".join([
        f"Measured {on}; NNCF {nncf or NOT_INSTALLED} "
        "(`pip install -e '.[bench]'`). Integer kernels, and so what ptqconv's latency plan "
        "keeps float, depend on the CPU (AVX2, VNNI): these figures hold for this CPU.",
        "",
        "Each manifest's metric on its eval split against the float model's outputs (1.0 is "
        "the float model where the metric compares with float; accuracy-type metrics compare "
        "with labels). Every tool calibrates on the same `calib/` `.bin` files. onnxruntime: "
        "`quantize_static` as usually run (QDQ, per-channel int8 weights, uint8 activations, "
        "MinMax, no pre-processing). NNCF: `nncf.quantize` with its default preset, "
        "`subset_size` the calibration count, `model_type=TRANSFORMER` for the models marked "
        "transformer (MatMuls and no Conv, or Softmax with LayerNormalization), models below "
        "opset 13 raised to 13 first. ptqconv AUTO: its default, a config naming only the "
        "calibration data (no activation_quant_method, bias_correction, equalize or "
        "smooth_quant), so ptqconv measures its candidates and keeps the best. The other "
        "ptqconv columns force one setting each (its defaults otherwise: reduce_range, "
        "SmoothQuant); W4A8 is `bit_num=4` with `activation_bit_num=8`. WeightQuant is "
        "`--bitNum` alone (at 4 bits ptqconv's default: MatMul/Gemm weights in blocks of 32, "
        "convs of 32 input channels or more blocked along them, depthwise convs and tables "
        "in 8 bits); onnxruntime's 4-bit weight-only tool is "
        "`MatMulNBitsQuantizer` with its defaults (MatMul weights in blocks of 128, the rest "
        "float). Weight-only models run with onnxruntime's default session options "
        "(MatMulNBits quantizes activations to int8 at accuracy level 4).",
        "",
        f"Manifest metrics ({on}):",
        "",
        table(["model", "metric (vs float)", "float", *labels], metric_rows, left=2),
        "",
        f"Output cosine against the float model ({on}; every output of every eval sample, "
        "averaged), and whether ptqconv's default (AUTO) is at least max(onnxruntime, NNCF) "
        "to the four decimals shown:",
        "",
        table(["model", "transformer", *cosine_labels, "AUTO >= max(onnxruntime, NNCF)"],
              cosine_rows, left=2),
        "",
        f"Conversion time (s; one run each, in its own process, imports included; {on}). "
        "AUTO builds and measures several candidates, so it costs more than one forced "
        "setting:",
        "",
        table(["model", "calib samples", *labels], time_rows),
        "",
        f"Latency against the float model ({on}; x float with {threads}; median of at least "
        f"{runs} runs of the first eval sample, and of as many as take the float model half "
        "a second, every model of a row timed in one process, "
        "interleaved, default session options: all graph optimizations) and the share of the "
        "Conv/MatMul/Gemm multiply-accumulates that run in integer kernels:",
        "",
        table(["model", "float (ms)", *TIMED], latency_rows),
    ])
