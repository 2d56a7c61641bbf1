"""python -m bench.hardswish [--calib N] [--blocks N] [--out-dir DIR]

A MobileNetV3-Large-like net (31 convs at 224x224, BN-free, every activation a hard-swish,
random weights, seed 0) in three spellings of hard-swish: one HardSwish op; HardSigmoid(x;
1/6, 1/2) * x; x * Clip(x + 3, 0, 6) / 6 (Add, Clip, Mul, Div). Each is converted by the
ptqconv command line in its own process (PostTraining, a config naming only the calibration
data: smooth random images; and the same with latency_aware=false, every unit quantized), then
timed against its float model with onnxruntime's default
session options, interleaved (`ptqconv.runtime.compare_latency`), at 2 threads and 1 thread.
Reported per spelling: quantized / float latency, what the summary kept float for speed and
the share of the Conv work onnxruntime runs in integer kernels. Also the `hardswish` section
of `python -m bench` (`--only hardswish`); standalone it writes `<out-dir>/hardswish.md`
and `.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .common import Context, Section, fmt, run_child, table
from .report import standalone

SHAPE = (1, 3, 224, 224)
SPELLINGS = {"hardswish": "HardSwish op", "hsig_mul": "HardSigmoid + Mul",
             "relu6": "x * Clip(x + 3, 0, 6) / 6"}
# (expand, out, kernel, stride): MobileNetV3-Large-like, every activation a hard-swish
BLOCKS = [(64, 24, 3, 2), (72, 24, 3, 1), (72, 40, 5, 2), (120, 40, 5, 1), (240, 80, 3, 2),
          (200, 80, 3, 1), (480, 112, 3, 1), (672, 160, 5, 2), (960, 160, 5, 1)]
CALIB = 8
BLOCKS_OF_ROUNDS = 3  # compare_latency calls per thread count, each up to 50 rounds
VARIANTS = {"defaults": "", "latency_aware=false": "[full_quant_param]\nlatency_aware=false\n"}


class Builder:
    """The net in one spelling of hard-swish; the same weights in every spelling."""

    def __init__(self, spelling: str, seed: int = 0):
        self.spelling = spelling
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits = [numpy_helper.from_array(np.array(v, np.float32), name)
                      for name, v in (("c3", 3.0), ("c0", 0.0), ("c6", 6.0))]
        self.n = 0
        self.convs = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, group: int = 1) -> str:
        w, b, y = self.name("w"), self.name("b"), self.name("conv")
        fan_in = cin // group * k * k
        weight = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)
        self.inits.append(numpy_helper.from_array(weight.astype(np.float32), w))
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal(cout) * 0.1).astype(np.float32), b))
        self.nodes.append(helper.make_node("Conv", [x, w, b], [y], name=y, kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[k // 2] * 4,
                                           group=group))
        self.convs += 1
        return y

    def hswish(self, x: str) -> str:
        y = self.name("hs")
        if self.spelling == "hardswish":
            self.nodes.append(helper.make_node("HardSwish", [x], [y], name=y))
        elif self.spelling == "hsig_mul":
            s = self.name("hsig")
            self.nodes += [helper.make_node("HardSigmoid", [x], [s], name=s, alpha=1 / 6,
                                            beta=0.5),
                           helper.make_node("Mul", [x, s], [y], name=y)]
        else:
            a, c, m = self.name("add"), self.name("clip"), self.name("mul")
            self.nodes += [helper.make_node("Add", [x, "c3"], [a], name=a),
                           helper.make_node("Clip", [a, "c0", "c6"], [c], name=c),
                           helper.make_node("Mul", [x, c], [m], name=m),
                           helper.make_node("Div", [m, "c6"], [y], name=y)]
        return y

    def build(self) -> onnx.ModelProto:
        x = self.hswish(self.conv("input", 3, 16, 3, 2))
        cin = 16
        for expand, out, k, stride in BLOCKS:
            h = self.hswish(self.conv(x, cin, expand, 1, 1))
            h = self.hswish(self.conv(h, expand, expand, k, stride, group=expand))
            h = self.conv(h, expand, out, 1, 1)
            if stride == 1 and cin == out:
                r = self.name("res")
                self.nodes.append(helper.make_node("Add", [x, h], [r], name=r))
                h = r
            x, cin = h, out
        x = self.hswish(self.conv(x, cin, 960, 1, 1))
        g = self.name("gap")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [g], name=g))
        x = self.hswish(self.conv(g, 960, 1280, 1, 1))
        x = self.conv(x, 1280, 1000, 1, 1)
        self.nodes.append(helper.make_node("Flatten", [x], ["logits"], name="flatten"))
        graph = helper.make_graph(
            self.nodes, f"mnv3like_{self.spelling}",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(SHAPE))],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def image(rng: np.random.Generator) -> np.ndarray:
    """A smooth random image, normalized (about zero mean, unit variance per channel): noise
    at 1/16 of the resolution, upsampled and blurred, plus a little fine noise."""
    coarse = rng.standard_normal((1, 3, SHAPE[2] // 16, SHAPE[3] // 16))
    x = np.repeat(np.repeat(coarse, 16, 2), 16, 3)
    for _ in range(3):  # a 3-tap box blur each way, three times
        x = (x + np.roll(x, 1, 2) + np.roll(x, -1, 2)) / 3
        x = (x + np.roll(x, 1, 3) + np.roll(x, -1, 3)) / 3
    x = x / x.std() + 0.1 * rng.standard_normal(SHAPE)
    return x.astype(np.float32)


def convert(args: list[str]) -> list[str]:
    """The ptqconv command line in this (child) process; its summary's lines."""
    from ptqconv.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(args)
    assert status == 0, f"ptqconv exit status {status}: {out.getvalue()[-500:]}"
    return out.getvalue().splitlines()


def _kept_float(summary: list[str]) -> str:
    """What the summary says was kept float for speed, and whether the float model was
    written unchanged ("none" when nothing was kept float)."""
    lines = [ln.strip() for ln in summary]
    kept = [ln.removeprefix("kept float for speed: ") for ln in lines
            if ln.startswith("kept float for speed:")]
    if any(ln.startswith("nothing quantized:") for ln in lines):
        kept.append("nothing quantized")
    if any(ln.startswith("written float:") for ln in lines):
        kept.append("written float: the input model unchanged (the output came out bigger)")
    return "; ".join(kept) or "none"


def measure(work: Path, spelling: str, calib: Path, feeds: dict[str, np.ndarray],
            threads: tuple[int, ...], blocks: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Convert one spelling twice (defaults; latency_aware=false, every unit integer) and time
    both against the float model, interleaved: `blocks` calls of compare_latency per thread
    count, the medians of their per-block ratios."""
    from ptqconv.evaluate.kernels import kernel_share
    from ptqconv.runtime import compare_latency

    builder = Builder(spelling)
    src = work / f"{spelling}.onnx"
    onnx.save(builder.build(), src)
    found: dict[str, Any] = {"convs": builder.convs, "variants": {}}
    models = {"float": src}
    for variant, extra in VARIANTS.items():
        slug = variant.replace("=", "_")
        out, config = work / f"{spelling}_{slug}.onnx", work / f"{slug}.ini"
        config.write_text(f"[data_preprocess_param]\ncalibrate_path=input:{calib}\n{extra}")
        args = [f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                f"--configFile={config}"]
        log(f"hard-swish {spelling}, {variant}: {builder.convs} convs; ptqconv "
            f"{shlex.join(args)}")
        child = run_child("bench.hardswish:convert", {"args": args}, timeout=1200)
        if not child.ok:
            found["variants"][variant] = {"error": child.error}
            log(f"  {child.error}")
            continue
        found["variants"][variant] = {"convert_seconds": child.seconds,
                                      "summary": child.result,
                                      "kept_float": _kept_float(child.result),
                                      "ms": {}, "ratio": {}}
        models[variant] = out
    for count in threads:
        runs = [compare_latency(models, feeds, count, float("inf")) for _ in range(blocks)]
        found.setdefault("float_ms", {})[str(count)] = statistics.median(
            r.ms["float"] for r in runs)
        found["rounds"] = runs[0].runs
        for variant in models.keys() - {"float"}:
            entry = found["variants"][variant]
            entry["ms"][str(count)] = statistics.median(r.ms[variant] for r in runs)
            entry["ratio"][str(count)] = statistics.median(
                r.ms[variant] / r.ms["float"] for r in runs)
            entry.setdefault("block_ratios", {})[str(count)] = [
                r.ms[variant] / r.ms["float"] for r in runs]
        log(f"  {count} thread(s): float {found['float_ms'][str(count)]:.1f} ms; " + ", ".join(
            f"{v} {found['variants'][v]['ratio'][str(count)]:.2f}x"
            for v in models if v != "float"))
    for label, path in models.items():
        share = kernel_share(path, feeds, threads[-1])
        if label == "float":
            found["float_kernels"] = share.to_dict()
        else:
            found["variants"][label]["kernels"] = share.to_dict()
            found["variants"][label]["integer_share"] = share.integer_share
    return found


def _summary_latency(summary: list[str]) -> str:
    line = next((ln for ln in summary if ln.strip().startswith("latency:")), "")
    match = re.search(r"\(([\d.]+x)", line)
    return match.group(1) if match else "–"


def section(tmp: Path, calib: int = CALIB, threads: tuple[int, ...] = (2, 1),
            blocks: int = BLOCKS_OF_ROUNDS, log: Callable[[str], None] = print) -> Section:
    """Every spelling measured in `tmp`, as one report section."""
    from ptqconv.runtime import MAX_RUNS, cpu_description

    start = time.perf_counter()
    tmp = Path(tmp)
    rng = np.random.default_rng(1)
    data = tmp / "calib"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(calib):
        image(rng).tofile(data / f"{i:06d}.bin")
    feeds = {"input": image(np.random.default_rng(2))}
    found = {}
    for spelling in SPELLINGS:
        work = tmp / spelling
        work.mkdir()
        found[spelling] = measure(work, spelling, data, feeds, threads, blocks, log)
    rows = []
    for spelling, r in found.items():
        for variant, v in r["variants"].items():
            label = f"{SPELLINGS[spelling]}, {variant}"
            if "error" in v:
                rows.append([label, v["error"], *["–"] * (len(threads) + 3)])
                continue
            rows.append([label, v["kept_float"],
                         " / ".join(fmt(r["float_ms"][str(n)], 1) for n in threads),
                         *[f"{v['ratio'][str(n)]:.2f}" for n in threads],
                         f"{v['integer_share']:.0%}", _summary_latency(v["summary"])])
    names = " / ".join(str(n) for n in threads)
    notes = []
    if all("float_ms" in found.get(k, {}) for k in ("hsig_mul", "relu6")):
        relu6, hsig = found["relu6"]["float_ms"], found["hsig_mul"]["float_ms"]
        notes.append(
            "Float against float, the same weights (timed in their own blocks): the "
            "x * Clip(x + 3, 0, 6) / 6 model takes "
            + " / ".join(f"{relu6[str(n)] / hsig[str(n)]:.2f}" for n in threads)
            + f" ({names} threads) the time of the HardSigmoid + Mul one (onnxruntime fuses "
            "HardSigmoid + Mul into the float Conv, not Add/Clip/Mul/Div).")
    cpu = cpu_description()
    markdown = "\n".join([
        f"CPU: {cpu}. The net: {next(iter(found.values()))['convs']} convs at 224x224, every "
        "activation a hard-swish, random weights (seed 0); converted by the ptqconv CLI "
        f"(PostTraining; {calib} smooth random calibration images; `defaults`: a config "
        "naming only them, `latency_aware=false`: the same with every unit quantized), timed "
        "against its float model with onnxruntime's default session options, every model of "
        f"a spelling interleaved, {blocks} x {MAX_RUNS} rounds at each thread count (median of "
        "the per-block ratios quantized / float). The integer share is of the Conv "
        "multiply-accumulates (`ptqconv.evaluate.kernels`); the last column is the latency "
        "ptqconv's own summary measured at conversion.",
        "",
        table(["spelling, config", "summary: kept float for speed",
               f"float ms ({names} threads)",
               *[f"x float, {n} thread{'s' if n > 1 else ''}" for n in threads],
               "Conv work in integer kernels", "summary's latency"], rows, 2),
        *(["", *notes] if notes else []),
    ])
    result = Section("hardswish", "Hard-swish spellings on a MobileNetV3-Large-like net",
                     markdown, {"cpu": cpu, "calib": calib, "threads": list(threads),
                                "blocks": blocks, "spellings": found})
    result.seconds = time.perf_counter() - start
    return result


def run(ctx: Context) -> Section:
    """The `python -m bench` section (`--only hardswish`); --quick: 2 calibration images."""
    threads = tuple(sorted({ctx.threads, 1}, reverse=True))
    return section(ctx.scratch("hardswish"), 2 if ctx.quick else CALIB, threads,
                   1 if ctx.quick else BLOCKS_OF_ROUNDS, ctx.log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hardswish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=CALIB, help="calibration images")
    parser.add_argument("--blocks", type=int, default=BLOCKS_OF_ROUNDS,
                        help="interleaved blocks of rounds per thread count")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return standalone("hardswish", argv, args.out_dir,
                      lambda tmp, log: section(tmp, args.calib, (2, 1), args.blocks, log))


if __name__ == "__main__":
    sys.exit(main())
