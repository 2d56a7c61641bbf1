"""Quantized-model latency against float, and what onnxruntime fuses: shared by the CNN and
BERT sections. Each model is timed in its own child process."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .common import Context, Measure, fmt, guarded, run_child, table

# Integer kernels onnxruntime's CPU provider can end up with after ORT_ENABLE_ALL.
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat",
               "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid",
               "QLinearLeakyRelu", "QLinearSoftmax", "QGemm", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "MatMulInteger", "ConvInteger", "QAttention",
               "MatMulNBits", "QLinearReduceMean", "QLinearWhere")
FLOAT_COMPUTE = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Attention")

def measure(ctx: Context, models: dict[str, Path | str], sample: Path, name: str,
            shape: tuple[int, ...], runs: int, warmup: int, repeat: int) -> dict[str, Any]:
    """Median latency (ms, median over `repeat` children of each child's median over `runs`)
    and the optimized graph's op counts, per model; a str instead of a path says why there
    is no model."""
    out: dict[str, Any] = {}
    for label, path in models.items():
        if isinstance(path, str) or not path.exists():
            out[label] = {"error": path if isinstance(path, str) else "no model"}
            continue
        optimized = path.with_name(path.stem + ".ort_opt.onnx")
        args = {"model": str(path), "optimized": str(optimized), "sample": str(sample),
                "name": name, "shape": list(shape), "threads": ctx.threads, "warmup": warmup,
                "runs": runs}
        m: Measure = guarded(ctx, f"latency {label}", lambda a=args: _one(a, repeat))
        optimized.unlink(missing_ok=True)
        if not m.ok:
            out[label] = {"error": m.error}
            continue
        ops = m.result["ops"]
        out[label] = {
            "ms": m.result["ms_median"], "ms_runs": m.result["ms_all"], "runs": runs,
            "children": len(m.runs), "rss_mb": m.rss_mb,
            "integer_ops": {k: ops[k] for k in INTEGER_OPS if ops.get(k)},
            "float_compute_left": sum(ops.get(k, 0) for k in FLOAT_COMPUTE),
            "dq_left": ops.get("DequantizeLinear", 0), "q_left": ops.get("QuantizeLinear", 0),
        }
        ctx.log(f"  latency {label}: {out[label]['ms']:.1f} ms, integer ops "
                f"{out[label]['integer_ops']}")
    return out


def _one(args: dict[str, Any], repeat: int) -> Measure:
    ms = []
    m = Measure()
    for _ in range(repeat):
        one = run_child("latency", args)
        if not one.ok:
            return one
        m.runs += one.runs
        ms.append(one.result["ms"])
        m.result = {**one.result, "ms_all": ms}
    m.result["ms_median"] = statistics.median(ms)
    return m


def markdown(results: dict[str, Any], floor_label: str = "float") -> str:
    base = results.get(floor_label, {}).get("ms")
    kinds = sorted({k for r in results.values() for k in r.get("integer_ops", {})},
                   key=INTEGER_OPS.index)
    rows = []
    for label, r in results.items():
        if "error" in r:
            rows.append([label, r["error"], "–", *["–"] * len(kinds), "–", "–"])
            continue
        rows.append([label, fmt(r["ms"], 1), fmt(r["ms"] / base if base else None),
                     *[r["integer_ops"].get(k, 0) for k in kinds], r["float_compute_left"],
                     r["dq_left"]])
    headers = ["model", "median latency (ms)", "x float", *kinds,
               "float Conv/MatMul/Gemm left", "DequantizeLinear left"]
    return table(headers, rows)
