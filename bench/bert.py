"""Calibration cost and latency on a generated BERT-base-sized encoder (random weights).

Same four tools and floor as the CNN section; then which integer kernels onnxruntime fuses in
each tool's output, and the latency against float.
"""

from __future__ import annotations

from . import latency
from .calibration import (
    Workload,
    compare,
    cost_data,
    cost_markdown,
    entropy_estimate,
    entropy_footprint,
    latency_models,
    quick_bins,
)
from .common import Context, Section
from .models import bert, normal_samples


def run(ctx: Context) -> Section:
    section = Section("bert", "Calibration cost and latency: BERT-base-sized encoder")
    tmp = ctx.scratch("bert")
    if ctx.quick:
        dims = {"layers": 2, "hidden": 128, "heads": 2, "ffn": 512, "seq": 32}
        counts = (5,)
    else:
        dims = {"layers": 12, "hidden": 768, "heads": 12, "ffn": 3072, "seq": 128}
        counts = (100, 300) if ctx.heavy else (100,)
    model = bert(tmp / "bert.onnx", **dims)
    shape = (1, dims["seq"], dims["hidden"])
    data = normal_samples(tmp / "hidden", max(counts), shape)
    params = (dims["layers"] * (4 * dims["hidden"] ** 2 + 2 * dims["hidden"] * dims["ffn"])
              / 1e6)
    ctx.log(f"BERT: {model.stat().st_size / 1e6:.0f} MB model, {params:.3g}M MatMul weights")
    w = Workload(model, data, "hidden", shape, ctx.scratch("bert/out"), quick_bins(ctx))
    tensors, per_sample = entropy_footprint(model)
    for count in counts:
        # One inference is 0.15-0.45 s on 2 cores: one run per case keeps the default run in
        # budget.
        skip = {}
        if not (ctx.heavy or ctx.quick):
            # Its 2048-bin threshold search alone takes minutes over this many tensors.
            skip["onnxruntime Entropy"] = (
                f"keeps {tensors} tensors, {per_sample:.0f} MB per sample, in memory: "
                f"~{per_sample * count / 1e3:.0f} GB at {count} samples; --heavy runs it under "
                f"a {ctx.mem_cap_gb:g} GB cap")
        compare(ctx, w, count, 1, skip)
    est = entropy_estimate(w)
    floor = w.results[counts[0]]["float inference (floor)"]
    # The floor includes imports and session creation: an upper bound per inference.
    per_inference = (f" (the float floor is {floor.seconds / counts[0] * 1000:.0f} ms per "
                     "sample, session creation included)" if floor.ok else "")
    section.data = {"model": {**dims, "file_mb": model.stat().st_size / 1e6,
                              "matmul_weights_m": params},
                    "entropy_footprint": {"tensors": tensors, "mb_per_sample": per_sample},
                    "cost": cost_data(w)}
    count = counts[0]
    models = latency_models(w, model, count)
    runs = 3 if ctx.quick else 10
    lat = latency.measure(ctx, models, next(iter(sorted(data.iterdir()))), "hidden", shape,
                          runs=runs, warmup=2, repeat=1)
    section.data["latency"] = lat
    est_text = (f" onnxruntime Entropy's peak RSS grows by {est[0]:.0f} MB per sample."
                if est else "")
    section.markdown = "\n".join([
        f"{dims['layers']} layers, hidden {dims['hidden']}, {dims['heads']} heads, FFN "
        f"{dims['ffn']}, sequence {dims['seq']} ({params:.3g}M MatMul weights, "
        f"{model.stat().st_size / 1e6:.0f} MB): Q/K/V MatMul+Add, Reshape/Transpose to heads, "
        "scaled Q.K^T, Softmax, .V, output projection, residual Add, LayerNormalization, "
        "FFN with Erf-form GELU, residual, LayerNormalization; float32 hidden states "
        f"{list(shape)} as input, standard-normal samples. Same cases and settings as the CNN "
        f"section; one run per case{per_inference}. "
        f"onnxruntime's calibrators observe {tensors} tensors here, {per_sample:.0f} MB per "
        f"sample (shape inference), which Entropy keeps for every sample.{est_text}",
        "",
        cost_markdown(w),
        "",
        f"Latency (median of {runs} runs after 2 warm-up, one process each, {ctx.threads} "
        "threads, ORT_ENABLE_ALL) and the nodes of onnxruntime's optimized graph:",
        "",
        latency.markdown(lat),
    ])
    return section
