"""Small PyTorch exports (`bench/exports/*.onnx`, trained a few hundred steps on synthetic
tasks by the torch scripts in `bench/exports/recipes/`): a 1-D audio CNN with PReLU, a
YOLO-style detector head, a ViT-tiny, a GPT-2-style decoder (token ids and a mask, tied
embeddings) and an EfficientNet-style net. Models this small are where the latency cost model
keeps every unit float, so the default output depends on timings: each is converted by the
ptqconv command line with a config naming only the calibration data (AUTO) and with
`latency_aware=false`, and by onnxruntime's `quantize_static` (QDQ, per-channel int8 weights,
uint8 activations, MinMax); reported per model: what ptqconv wrote, output cosine against
float on held-out samples, latency against float (interleaved, 2 threads) and size. The
calibration (32) and held-out (16) samples are drawn here by numpy, in the families the
models were trained on. The `exports` section of `python -m bench` (`--only exports`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .common import Context, Section, fmt, run_child, table

HERE = Path(__file__).resolve().parent / "exports"
CALIB, HELD_OUT = 32, 16


def smooth_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """[n, 1, 3, size, size]: 4x4 noise upsampled (bilinear) plus a little fine noise."""
    coarse = rng.standard_normal((n, 3, 4, 4))
    grid = np.linspace(0, 3, size)
    low, frac = np.minimum(grid.astype(int), 2), grid - np.minimum(grid.astype(int), 2)
    rows = coarse[:, :, low] * (1 - frac)[:, None] + coarse[:, :, low + 1] * frac[:, None]
    x = rows[..., low] * (1 - frac) + rows[..., low + 1] * frac
    x = x + 0.1 * rng.standard_normal(x.shape)
    return x[:, None].astype(np.float32)


def waves(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 1, 1, 1600]: three sines of 200-3200 Hz at 16 kHz, a little noise."""
    t = np.arange(1600) / 16000.0
    freq = 200 + rng.random((n, 3)) * 3000
    x = 0.3 * np.sin(6.28 * freq[:, :, None] * t).sum(1, keepdims=True)
    x = x + 0.05 * rng.standard_normal((n, 1, 1600))
    return x[:, None].astype(np.float32)


def tokens(rng: np.random.Generator, n: int, length: int = 32, vocab: int = 256
           ) -> tuple[np.ndarray, np.ndarray]:
    """Arithmetic runs of token ids with 10% random ones, and masks of 20 to 32 ones."""
    start, step = rng.integers(0, vocab, (n, 1)), rng.integers(1, 7, (n, 1))
    ids = (start + step * np.arange(length)) % vocab
    ids = np.where(rng.random((n, length)) < 0.1, rng.integers(0, vocab, (n, length)), ids)
    mask = (np.arange(length)[None] < rng.integers(20, length + 1, (n, 1))).astype(np.int64)
    return ids[:, None].astype(np.int64), mask[:, None]


# name -> (file, {input: samples drawn by seed}); samples [n, 1, ...] per input.
Draw = Callable[[np.random.Generator, int], dict[str, np.ndarray]]
MODELS: dict[str, tuple[str, Draw]] = {
    "1-D audio CNN": ("audio_cnn.onnx", lambda rng, n: {"wave": waves(rng, n)}),
    "YOLO-style head": ("yolo_head.onnx",
                        lambda rng, n: {"images": smooth_images(rng, n, 64)}),
    "ViT-tiny": ("vit_tiny.onnx", lambda rng, n: {"input": smooth_images(rng, n, 32)}),
    "GPT-2-style decoder": ("gpt2_tiny.onnx", lambda rng, n: dict(
        zip(("input_ids", "attention_mask"), tokens(rng, n), strict=True))),
    "EfficientNet-style net": ("effnet_small.onnx",
                               lambda rng, n: {"input": smooth_images(rng, n, 64)}),
}
# label -> (--quantType, config lines after the calibration data). WeightQuant: the defaults
# with calibration data (GPTQ), Conv weights folded at load and the rest measured
# (README, weight-only quantization).
VARIANTS = {
    "ptqconv default": ("PostTraining", "[full_quant_param]\n"),
    "ptqconv latency_aware=false": ("PostTraining", "[full_quant_param]\nlatency_aware=false\n"),
    "ptqconv WeightQuant 8-bit": ("WeightQuant", "[common_quant_param]\nbit_num=8\n"),
    "ptqconv WeightQuant 4-bit": ("WeightQuant", "[common_quant_param]\nbit_num=4\n"),
}


def _written(summary: list[str]) -> str:
    """What the summary says the latency checks wrote."""
    lines = [ln.strip() for ln in summary]
    if any(ln.startswith("WeightQuant") for ln in lines):
        if any(ln.startswith("weights dequantized at load") for ln in lines):
            return "weights folded at load (timed faster)"
        return "as written"
    if any(ln.startswith("dynamic quantization") and "written instead" in ln for ln in lines):
        return "DynamicQuant's model"
    check = next((ln for ln in lines if ln.startswith("latency check")), "")
    if "kept all-integer" in check:
        return "all-integer"
    if any(ln.startswith("nothing quantized") for ln in lines):
        return "float (the plan)"
    return "the plan" if check else "as configured (not checked)"


def _cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The least cosine over the float outputs of one sample."""
    return min(float(np.dot(x.ravel().astype(np.float64), y.ravel())
                     / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30))
               for x, y in zip(a, b, strict=True) if x.dtype.kind == "f")


def measure(work: Path, name: str, log: Callable[[str], None]) -> dict[str, Any]:
    """One model converted every way, scored and timed."""
    import onnxruntime as ort

    from ptqconv.runtime import compare_latency

    file, draw = MODELS[name]
    src = HERE / file
    calib, held = draw(np.random.default_rng(7), CALIB), draw(np.random.default_rng(8), HELD_OUT)
    dirs = {}
    for input_name, samples in calib.items():
        dirs[input_name] = work / "calib" / input_name
        dirs[input_name].mkdir(parents=True)
        for i, sample in enumerate(samples):
            sample.tofile(dirs[input_name] / f"{i:06d}.bin")
    shapes = ";".join(f"{k}:{','.join(map(str, v.shape[1:]))}" for k, v in calib.items())
    found: dict[str, Any] = {"variants": {}}
    outputs = {"float": src}
    for variant, (kind, extra) in VARIANTS.items():
        out, config = work / f"{len(outputs)}.onnx", work / f"{len(outputs)}.ini"
        config.write_text("[data_preprocess_param]\ncalibrate_path="
                          + ",".join(f"{k}:{d}" for k, d in dirs.items())
                          + f"\ninput_shape={shapes}\n{extra}")
        args = [f"--modelFile={src}", f"--outputFile={out}", f"--quantType={kind}",
                f"--configFile={config}"]
        child = run_child("bench.hardswish:convert", {"args": args}, timeout=1200)
        if not child.ok:
            found["variants"][variant] = {"error": child.error}
            log(f"  {name}, {variant}: {child.error}")
            continue
        found["variants"][variant] = {"seconds": child.seconds, "summary": child.result,
                                      "written": _written(child.result)}
        outputs[variant] = out
    ort_out = work / "onnxruntime.onnx"
    inputs = [{"name": k, "dir": str(d), "dtype": str(calib[k].dtype),
               "shape": list(calib[k].shape[1:])} for k, d in dirs.items()]
    child = run_child("ort_static", {"model": str(src), "out": str(ort_out),
                                     "inputs": inputs, "count": CALIB})
    if child.ok:
        found["variants"]["onnxruntime quantize_static"] = {"seconds": child.seconds}
        outputs["onnxruntime quantize_static"] = ort_out
    else:
        found["variants"]["onnxruntime quantize_static"] = {"error": child.error}
    nbits_out, label = work / "nbits.onnx", "onnxruntime MatMulNBitsQuantizer 4-bit"
    child = run_child("ort_nbits", {"src": str(src), "out": str(nbits_out), "external": False})
    found["variants"][label] = ({"seconds": child.seconds} if child.ok
                                else {"error": child.error})
    if child.ok:
        outputs[label] = nbits_out
    feeds = [{k: v[i] for k, v in held.items()} for i in range(HELD_OUT)]
    # Timed before any session of this process exists: an idle onnxruntime session's threads
    # spin and take the cores from the ones being timed.
    timed = compare_latency(outputs, feeds[0], 2)
    found["float_ms"] = timed.ms["float"]
    found["cpu"] = timed.cpu
    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for k, p in outputs.items()}
    reference = [sessions["float"].run(None, f) for f in feeds]
    for label in outputs.keys() - {"float"}:
        entry = found["variants"][label]
        entry["cosine"] = float(np.mean([_cosine(r, sessions[label].run(None, f))
                                         for r, f in zip(reference, feeds, strict=True)]))
        entry["ratio"] = timed.ms[label] / timed.ms["float"]
        entry["size"] = outputs[label].stat().st_size / src.stat().st_size
        log(f"  {name}, {label}: {entry.get('written', '')} cosine {entry['cosine']:.5f}, "
            f"{entry['ratio']:.2f}x float, {entry['size']:.3f} of the size")
    return found


def section(tmp: Path, log: Callable[[str], None] = print) -> Section:
    start = time.perf_counter()
    found = {}
    for name in MODELS:
        work = Path(tmp) / MODELS[name][0].removesuffix(".onnx")
        work.mkdir(parents=True)
        found[name] = measure(work, name, log)
    rows = []
    for name, r in found.items():
        for label, v in r["variants"].items():
            if "error" in v:
                rows.append([name, label, v["error"], "–", "–", "–", "–"])
                continue
            rows.append([name, label, v.get("written", "–"), fmt(v["cosine"], 5),
                         f"{v['ratio']:.2f}", f"{v['size']:.3f}", fmt(v["seconds"], 1)])
    cpu = next(iter(found.values()))["cpu"]
    markdown = "\n".join([
        f"CPU: {cpu}. Each model converted in its own process on {CALIB} calibration samples; "
        f"output cosine against float: the least over a sample's float outputs, mean over "
        f"{HELD_OUT} held-out samples; latency: the first held-out sample, every model of a row "
        "group interleaved (`ptqconv.runtime.compare_latency`, 2 threads, onnxruntime's "
        "default session options). \"written\" is what ptqconv's latency checks kept: the "
        "cost model's plan, all-integer (where the plan kept every unit float, written unless "
        "a float model runs faster), or DynamicQuant's model; for WeightQuant (calibration "
        "data, so GPTQ weights), the file as written or with every weight folded at load "
        "where the converter's own timing found that faster than as written and float "
        "slower. onnxruntime's MatMulNBitsQuantizer (blocks of 128) quantizes MatMul weights "
        "only.",
        "",
        table(["model", "tool, config", "written", "output cosine", "x float latency",
               "x float size", "conversion (s)"], rows, 3),
    ])
    result = Section("exports", "Small PyTorch exports: what the default writes", markdown,
                     {"cpu": cpu, "models": found})
    result.seconds = time.perf_counter() - start
    return result


def run(ctx: Context) -> Section:
    """The `python -m bench` section (`--only exports`)."""
    return section(ctx.scratch("exports"), ctx.log)
