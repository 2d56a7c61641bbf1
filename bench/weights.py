"""Weight algorithms on the real-model corpus (issue 12): WeightQuant with round to nearest,
GPTQ, bias correction and blocks, and W4A8 with GPTQ weights, each manifest's metric on
eval/ against the float model; calibration on calib/. By default the two models the targets
name; --heavy runs every corpus model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .accuracy import BUILD_HINT, _cell
from .common import Context, Section, fmt, guarded, run_child, table
from .corpus import CorpusModel, metric, models, outputs

TARGET_MODELS = ("mobilenet_v2", "all_minilm_l6_v2")
# (column, bits, [weight_quant_param] keys or None for PostTraining W4A8 MSE + bias corr.)
VARIANTS: tuple[tuple[str, int, dict[str, str] | None], ...] = (
    # Nearest named: with calibration data GPTQ is ptqconv's default at 1-8 bits.
    ("8-bit nearest", 8, {"quant_strategy": "MAX_MIN"}),
    ("8-bit GPTQ", 8, {"quant_strategy": "GPTQ"}),
    ("8-bit bias corr.", 8, {"bias_correction": "true", "quant_strategy": "MAX_MIN"}),
    ("4-bit nearest", 4, {"quant_strategy": "MAX_MIN"}),
    ("4-bit GPTQ", 4, {"quant_strategy": "GPTQ"}),
    ("4-bit GPTQ + bias corr.", 4, {"quant_strategy": "GPTQ", "bias_correction": "true"}),
    ("4-bit blocks of 32, GPTQ", 4, {"quant_strategy": "GPTQ", "block_size": "32"}),
    ("4-bit blocks of 16, GPTQ", 4, {"quant_strategy": "GPTQ", "block_size": "16"}),
    ("4-bit blocks of 16, GPTQ + bias corr.", 4,
     {"quant_strategy": "GPTQ", "bias_correction": "true", "block_size": "16"}),
    ("W4A8 MSE + bias corr., GPTQ", 4, None),
)


def _case(m: CorpusModel, variant: tuple[str, int, dict[str, str] | None], out: Path,
          tmp: Path) -> tuple[str, dict[str, Any]]:
    label, bits, keys = variant
    stem = tmp / f"{m.name}_{label.replace(' ', '_').replace(',', '')}.ini"
    if keys is None:
        config = m.ini_config("MSE", stem, True, bits, "GPTQ")
        kind = "PostTraining"
    else:
        config = m.weight_config(stem, bits, keys)
        kind = "WeightQuant"
    return "ptqconv", {"args": [f"--modelFile={m.model}", f"--outputFile={out}", "--quiet",
                                f"--quantType={kind}", f"--configFile={config}"]}


def run(ctx: Context) -> Section:
    section = Section("weights", "Weight algorithms on real models")
    if ctx.corpus is None or not Path(ctx.corpus).is_dir():
        message = f"no corpus ({ctx.corpus}); {BUILD_HINT}; skipping weights"
        print(message, flush=True)
        section.markdown = f"Skipped: {message}."
        section.data = {"skipped": message}
        return section
    found = models(Path(ctx.corpus), None if ctx.heavy else list(TARGET_MODELS))
    variants = VARIANTS[:2] if ctx.quick else VARIANTS
    if ctx.quick:
        found = [m for m in found if m.name == "mobilenet_v2"] or found[:1]
    tmp = ctx.scratch("weights")
    rows: list[dict[str, Any]] = []
    for m in found:
        ctx.log(f"weights: {m.name}")
        ref = outputs(m.model, m)
        name, _, _ = metric(m, ref, ref)
        row: dict[str, Any] = {"model": m.name, "metric": name, "variants": {}}
        for variant in variants:
            out = tmp / f"{m.name}.onnx"
            child = _case(m, variant, out, tmp)
            conv = guarded(ctx, f"{m.name}, {variant[0]}",
                           lambda c=child: run_child(*c, 1, ctx.mem_cap_gb))
            entry: dict[str, Any] = {"convert_seconds": conv.seconds if conv.ok else None}
            if conv.ok:
                _, value, extra = metric(m, ref, outputs(out, m))
                entry.update(value=value, extra=extra, size_mb=out.stat().st_size / 1e6)
            else:
                entry["error"] = conv.error
            for path in out.parent.glob(out.name + "*"):
                path.unlink()
            row["variants"][variant[0]] = entry
        rows.append(row)
    labels = [v[0] for v in variants]
    section.data = {"models": rows}
    section.markdown = "\n".join([
        "WeightQuant on each model's calibration samples (GPTQ, bias correction) with the "
        "`[weight_quant_param]` keys named; \"bias corr.\" is MindSpore's var/mean weight "
        "correction plus the expected output shift op(E[x], W - Ŵ) in Conv/Gemm biases. "
        "4-bit without `block_size` is ptqconv's default there: MatMul/Gemm weights in "
        "blocks of 32, conv weights of 32 input channels or more in blocks of 32 along "
        "them, depthwise convs and tables in 8 bits; the \"blocks of\" columns block the "
        "tables too (depthwise convs in 8 bits there as well). "
        "W4A8 is PostTraining with MSE ranges, bias correction and GPTQ weights. Each "
        "manifest's metric on eval/ against float (extra figure in brackets), onnxruntime's "
        "default session options.",
        "",
        table(["model", "metric (vs float)", *labels],
              [[r["model"], r["metric"], *[_cell(r["variants"][x]) for x in labels]]
               for r in rows], left=2),
        "",
        "Conversion time (s) and size (MB):",
        "",
        table(["model", *labels],
              [[r["model"], *[f"{fmt(r['variants'][x].get('convert_seconds'), 0)} / "
                              f"{fmt(r['variants'][x].get('size_mb'), 1)}" for x in labels]]
               for r in rows]),
    ])
    return section
