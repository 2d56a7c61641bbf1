"""Dynamic quantization beside onnxruntime's quantize_dynamic on a corpus model.

    python -m bench.dynamic --corpus CORPUS_DIR      # all_minilm_l6_v2: bench/dynamic.md
    python -m bench.dynamic --corpus CORPUS_DIR --model silero_vad_16k_sequence
                                                     # bench/dynamic-silero_vad_16k_sequence.md

Output cosine of every eval sample against the float model, median latency of the first eval
sample (2 threads, ORT_ENABLE_ALL, each model in its own session), size, and the nodes of
onnxruntime's optimized graph.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

import ptqconv
from ptqconv.runtime import bound_spinning

MODEL = "all_minilm_l6_v2"
# Rounds over every model in turn, LOOPS runs each: the 2-core VM's load drifts, and a drift
# then reaches every model alike.
ROUNDS, LOOPS, WARM_UP = 10, 10, 5


def _session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    # Bounded, as ptqconv's compare_latency: the idle sessions' threads would take the cores.
    bound_spinning(options)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _samples(root: Path) -> list[dict[str, np.ndarray]]:
    manifest = json.loads((root / "manifest.json").read_text())
    count = manifest["splits"]["eval"]["count"]
    return [{x["name"]: np.fromfile(root / "eval" / x["dir"] / f"{i:06d}.bin",
                                    dtype=x["dtype"]).reshape(x["shape"])
             for x in manifest["inputs"]} for i in range(count)]


def _measure(path: Path, samples, reference) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(path, Path(tmp) / "opt.onnx")
        ops = collections.Counter(n.op_type for n in onnx.load(str(Path(tmp) / "opt.onnx"),
                                                               load_external_data=False).graph.node)
    outputs = [session.run(None, s)[0].ravel() for s in samples]
    cosines = [float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
               for a, b in zip(outputs, reference, strict=True)] if reference else [1.0]
    for _ in range(WARM_UP):
        session.run(None, samples[0])
    keep = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger",
            "DynamicQuantizeLinear", "MatMul", "FusedMatMul", "Gemm", "DynamicQuantizeLSTM",
            "LSTM", "ConvInteger", "Conv")
    return {"cosine_mean": float(np.mean(cosines)), "cosine_min": float(np.min(cosines)),
            "times": [], "session": session, "size_mb": path.stat().st_size / 1e6,
            "ops": {k: ops[k] for k in keep if ops[k]}, "outputs": outputs}


def _time(results: dict, sample: dict[str, np.ndarray]) -> None:
    for _ in range(ROUNDS):
        for r in results.values():
            for _ in range(LOOPS):
                start = time.perf_counter()
                r["session"].run(None, sample)
                r["times"].append(time.perf_counter() - start)
    for r in results.values():
        r["latency_ms"] = statistics.median(r["times"]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=os.environ.get("PTQCONV_CORPUS"))
    parser.add_argument("--model", default=MODEL, help=f"corpus model (default {MODEL})")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.out = args.out or Path(__file__).parent / (
        "dynamic.md" if args.model == MODEL else f"dynamic-{args.model}.md")
    root = args.corpus / args.model
    src = root / "model.onnx"
    samples = _samples(root)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases: dict[str, Path] = {"float": src}
        ptq = work / "ptqconv.onnx"
        ptqconv.convert(src, ptq, "DynamicQuant")
        cases["ptqconv DynamicQuant ALWC (target auto)"] = ptq
        full = work / "full.cfg"
        full.write_text("[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n"
                        "[full_quant_param]\nreduce_range=false\n")
        ptq8 = work / "ptqconv8.onnx"
        ptqconv.convert(src, ptq8, "DynamicQuant", config_file=full)
        cases["ptqconv DynamicQuant ALWC, 8-bit weights"] = ptq8
        for per_channel in (False, True):
            for reduce_range in (False, True):
                out = work / f"ort-{per_channel}-{reduce_range}.onnx"
                quantize_dynamic(str(src), str(out), per_channel=per_channel,
                                 reduce_range=reduce_range, weight_type=QuantType.QInt8)
                cases[f"onnxruntime quantize_dynamic per_channel={per_channel} "
                      f"reduce_range={reduce_range}"] = out
        results, reference = {}, None
        for name, path in cases.items():
            results[name] = _measure(path, samples, reference)
            if reference is None:
                reference = results[name]["outputs"]
        _time(results, samples[0])
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    command = "python -m bench.dynamic" + (f" --model {args.model}" if args.model != MODEL
                                            else "")
    lines = [f"# Dynamic quantization: {args.model}, {len(samples)} eval samples", "",
             f"`{command}`, onnxruntime {ort.__version__}, {cpu}, 2 threads, "
             f"ORT_ENABLE_ALL; latency: median of {ROUNDS} x {LOOPS} runs of eval sample 0 "
             f"after {WARM_UP} warm-up, the models taking turns.", "",
             "| model | output cosine mean (min) | latency ms | x float | size MB | "
             "onnxruntime's optimized graph |", "|---|---:|---:|---:|---:|---|"]
    base = results["float"]["latency_ms"]
    for name, r in results.items():
        ops = ", ".join(f"{k} {v}" for k, v in r["ops"].items())
        lines.append(f"| {name} | {r['cosine_mean']:.4f} ({r['cosine_min']:.4f}) | "
                     f"{r['latency_ms']:.2f} | {r['latency_ms'] / base:.2f} | "
                     f"{r['size_mb']:.1f} | {ops} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
