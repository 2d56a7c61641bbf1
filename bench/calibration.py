"""Calibration cost: ptqconv KL / MAX_MIN vs onnxruntime Entropy / MinMax, same model and data.

    python bench/calibration.py [--samples 300] [--repeat 1] [--skip-ort-entropy]

A ResNet-18-sized CNN at 224x224 (random weights) and N smooth random images as .bin files.
Each case runs in its own process; time and peak RSS (VmHWM) are reported with ratios against
onnxruntime and against the float inference of the same samples (the floor any calibration
pays). onnxruntime's Entropy runs with num_bins=2048 (its default of 128 gives the MinMax
range, REFERENCE.md §2), so both KL searches see the same resolution. Also reports the
median latency of the quantized models against the float model, with the fused integer node
counts after onnxruntime's optimization.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, now, run_child
from models import image_samples, resnet18

ort.set_default_logger_severity(3)

FLOAT_RUN = """
import numpy as np, onnxruntime as ort
from pathlib import Path
so = ort.SessionOptions(); so.intra_op_num_threads = {threads}
s = ort.InferenceSession({model!r}, so, providers=["CPUExecutionProvider"])
for f in sorted(Path({data!r}).iterdir()):
    s.run(None, {{"input": np.fromfile(f, np.float32).reshape(1, 3, 224, 224)}})
"""

PTQCONV = """
from ptqconv.cli import main
assert main(["--modelFile={model}", "--outputFile={out}", "--quantType=PostTraining",
             "--configFile={config}", "--quiet"]) == 0
"""

ORT = """
import numpy as np
from pathlib import Path
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
class Reader(CalibrationDataReader):
    def __init__(self):
        self.files = iter(sorted(Path({data!r}).iterdir()))
    def get_next(self):
        f = next(self.files, None)
        shape = (1, 3, 224, 224)
        return None if f is None else {{"input": np.fromfile(f, np.float32).reshape(shape)}}
quantize_static({model!r}, {out!r}, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.{method}, extra_options={extra})
"""


def latency(path: Path, threads: int, runs: int = 30) -> tuple[float, collections.Counter]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(path) + ".opt"
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"input": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - start)
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath)
                              .graph.node)
    return statistics.median(times) * 1000, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-ort-entropy", action="store_true",
                        help="onnxruntime's Entropy keeps every activation in memory (~9 GB "
                             "at 300 samples)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = resnet18(tmp / "resnet18.onnx")
        data = image_samples(tmp / "input", args.samples)
        cases: dict[str, str] = {
            "float inference (floor)": FLOAT_RUN.format(threads=args.threads, model=str(model),
                                                        data=str(data)),
        }
        for method in ("MAX_MIN", "KL"):
            config = tmp / f"{method}.ini"
            config.write_text(f"[data_preprocess_param]\ncalibrate_path=input:{data}\n"
                              f"calibrate_size={args.samples}\n[full_quant_param]\n"
                              f"activation_quant_method={method}\nthread_num={args.threads}\n")
            cases[f"ptqconv {method}"] = PTQCONV.format(model=model, out=tmp / f"p_{method}.onnx",
                                                       config=config)
        ort_methods = [("MinMax", "{}")]
        if not args.skip_ort_entropy:
            ort_methods.append(("Entropy", "{'CalibNumBins': 2048}"))
        for method, extra in ort_methods:
            cases[f"onnxruntime {method}"] = ORT.format(data=str(data), model=str(model),
                                                        out=str(tmp / f"o_{method}.onnx"),
                                                        method=method, extra=extra)
        results = {}
        for name, code in cases.items():
            results[name] = run_child(code, args.repeat)
            print(f"{name}: {results[name]['seconds']:.1f} s, {results[name]['rss_mb']:.0f} MB",
                  flush=True)
        lat = {"float": latency(model, args.threads)}
        for name, path in (("ptqconv MAX_MIN", tmp / "p_MAX_MIN.onnx"),
                           ("ptqconv KL", tmp / "p_KL.onnx"),
                           ("onnxruntime MinMax", tmp / "o_MinMax.onnx")):
            lat[name] = latency(path, args.threads)

    floor = results["float inference (floor)"]["seconds"]
    print(f"\nCalibration bench, {now()}, {machine()}")
    print(f"ResNet-18-sized CNN (11.7M parameters), 224x224, {args.samples} samples, "
          f"{args.threads} threads, medians of {args.repeat} run(s)\n")
    print("| case | time (s) | x float inference | peak RSS (MB) |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / floor:.2f} | {r['rss_mb']:.0f} |")
    pairs = [("ptqconv MAX_MIN", "onnxruntime MinMax"), ("ptqconv KL", "onnxruntime Entropy")]
    for ours, theirs in pairs:
        if theirs in results:
            a, b = results[ours], results[theirs]
            print(f"\n{ours} / {theirs}: time {a['seconds'] / b['seconds']:.2f}x, "
                  f"peak RSS {a['rss_mb'] / b['rss_mb']:.2f}x")
    print("\n| model | median latency (ms) | x float | QLinearConv | QLinearAdd | QGemm | "
          "float Conv left |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = lat["float"][0]
    for name, (ms, ops) in lat.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f} | {ops['QLinearConv']} | "
              f"{ops['QLinearAdd']} | {ops['QGemm']} | {ops['Conv'] + ops['FusedConv']} |")


if __name__ == "__main__":
    main()
