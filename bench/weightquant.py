"""WeightQuant cost: ptqconv 8- and 4-bit against onnxruntime's nearest tools, on MatMul models
of ~100 MB (default) and ~3 GB (--heavy; external data), time and peak RSS per run.

onnxruntime has no 8-bit weight-only mode: its nearest is quantize_dynamic (int8 per-channel
weights, activations quantized at run time); its 4-bit weight-only tool is MatMulNBitsQuantizer
(blocks of 128).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .common import (
    Context,
    Measure,
    Section,
    fmt,
    guarded,
    measure_cell,
    ratio,
    run_child,
    table,
)
from .models import mlp

CASES = {
    "ptqconv WeightQuant 8-bit": lambda **k: _ptqconv(bits=8, **k),
    "ptqconv WeightQuant 4-bit": lambda **k: _ptqconv(bits=4, **k),
    "onnxruntime quantize_dynamic int8 per-channel": lambda **k: ("ort_dynamic", k),
    "onnxruntime MatMulNBitsQuantizer 4-bit": lambda **k: ("ort_nbits", k),
}


def _ptqconv(src: str, out: str, bits: int, external: bool) -> tuple[str, dict[str, Any]]:
    # Timed like onnxruntime's tools, which do not time their outputs against float.
    config = Path(out).parent / "no_latency.ini"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[weight_quant_param]\nmeasure_latency=false\n")
    return "ptqconv", {"args": [f"--modelFile={src}", f"--outputFile={out}",
                                "--quantType=WeightQuant", f"--bitNum={bits}",
                                f"--configFile={config}", "--quiet"]}
PAIRS = (("ptqconv WeightQuant 8-bit", "onnxruntime quantize_dynamic int8 per-channel"),
         ("ptqconv WeightQuant 4-bit", "onnxruntime MatMulNBitsQuantizer 4-bit"))


def _size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir()) / 1e6


def run(ctx: Context) -> Section:
    section = Section("weightquant", "Weight-only quantization cost")
    sizes: list[tuple[float, int]] = [(4, 512)] if ctx.quick else [(100, 2048)]
    if ctx.heavy:
        sizes.append((3000, 4096))
    rows, ratio_rows, data = [], [], {}
    for megabytes, width in sizes:
        tmp = ctx.scratch(f"wq{megabytes:g}")
        src = tmp / "src" / "float.onnx"
        src.parent.mkdir(exist_ok=True)
        model_mb = mlp(src, megabytes, width) / 1e6
        external = (src.parent / "float.onnx.data").exists()
        ctx.log(f"WeightQuant: {model_mb:.0f} MB model{' (external data)' if external else ''}")
        # The 3 GB cases take minutes each: one run.
        repeat = ctx.repeat if megabytes < 1000 else 1
        results: dict[str, Measure] = {}
        outputs: dict[str, Any] = {}
        for i, (name, make) in enumerate(CASES.items()):
            out_dir = tmp / f"out{i}"
            out_dir.mkdir(exist_ok=True)
            child = make(src=str(src), out=str(out_dir / "q.onnx"), external=external)
            # ptqconv maps external data (address space, not memory): RSS cap only.
            hard = not name.startswith("ptqconv")
            results[name] = guarded(
                ctx, f"{model_mb:.0f} MB, {name}",
                lambda c=child, r=repeat, h=hard: run_child(*c, r, ctx.mem_cap_gb, address_cap=h))
            outputs[name] = _size_mb(out_dir) if results[name].ok else None
            shutil.rmtree(out_dir)  # several GB at the heavy size
        shutil.rmtree(tmp)
        for name, m in results.items():
            rows.append([f"{model_mb:.0f}", name, len(m.runs) or "–",
                         measure_cell(m, "seconds"), measure_cell(m, "rss_mb", 0, why=False),
                         fmt(m.rss_mb / model_mb if m.ok else None),
                         fmt(outputs[name], 1)])
        ratio_rows.append([f"{model_mb:.0f}", *(
            fmt(ratio(results[a], results[b], attr)) for a, b in PAIRS
            for attr in ("seconds", "rss_mb"))])
        data[f"{megabytes:g}MB"] = {"model_mb": model_mb, "width": width, "external": external,
                                    "cases": {n: {**m.as_dict(), "output_mb": outputs[n]}
                                              for n, m in results.items()}}
    section.data = data
    section.markdown = "\n".join([
        "MatMul chains with random float32 weights (cost, not accuracy); models over 1 GB "
        "keep their weights as external data. Each run in its own process, peak RSS from "
        "VmHWM (it includes about 80 MB of Python and library imports). onnxruntime has no "
        "8-bit weight-only mode: `quantize_dynamic` (int8 per-channel weights, activations "
        "quantized at run time) is its nearest; its 4-bit tool `MatMulNBitsQuantizer` uses "
        "blocks of 128, ptqconv's 4-bit default blocks of 32 (more scales to write).",
        "",
        table(["model (MB)", "tool", "runs", "time (s)", "peak RSS (MB)", "RSS / model size",
               "output (MB)"], rows, left=2),
        "",
        "ptqconv / onnxruntime:",
        "",
        table(["model (MB)", "8-bit time", "8-bit peak RSS", "4-bit time", "4-bit peak RSS"],
              ratio_rows),
    ])
    return section
