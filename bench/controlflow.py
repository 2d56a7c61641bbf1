"""python -m bench.controlflow [--rounds N] [--out-dir DIR]

ptqconv on recurrent models whose work lives in If / Loop / Scan bodies (tests/cf_models.py):
what onnxruntime runs as integer kernels in each body, the outputs' cosine against the float
model, latency against float (one thread, float and quantized interleaved round by round,
median and IQR of the per-round ratios), and size. Writes `<out-dir>/controlflow.md` and
`.json`; the README's control-flow figures come from it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .common import Context, Section, fmt, table
from .report import standalone

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import cf_models
from models import write_samples

import ptqconv
from ptqconv import runtime
from ptqconv.graph.subgraphs import bodies
from ptqconv.passes.body_plan import integer_kernel

FLOAT_WEIGHT_OPS = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _streaming(work: Path, hidden: int) -> tuple[Path, Path, Callable, Callable]:
    """The streaming If model, calibrated on 64 steps of its own float run; evaluated on a
    stream of 200 steps each model runs from its own state."""
    src = work / "float.onnx"
    onnx.save(cf_models.streaming_model(hidden=hidden), src)
    samples = cf_models.stream(src, 64, hidden=hidden)
    dirs = {n: write_samples(work / n, [s[n] for s in samples]) for n in ("x", "h", "active")}
    config = work / "c.ini"
    config.write_text("[data_preprocess_param]\ncalibrate_path="
                      + ",".join(f"{n}:{d}" for n, d in dirs.items()) + "\ncalibrate_size=64\n")
    steps = cf_models.stream(src, 200, hidden=hidden, seed=11)

    def run(session: ort.InferenceSession) -> list[np.ndarray]:
        h, found = np.zeros((1, hidden), np.float32), []
        for feeds in steps:
            h, logits = session.run(None, {**feeds, "h": h})
            found.append(logits)
        return found

    def outputs(session: ort.InferenceSession) -> np.ndarray:
        return np.stack(run(session))

    return src, config, run, outputs


def _sequence(work: Path, build: Callable, hidden: int) -> tuple[Path, Path, Callable, Callable]:
    """A Loop or Scan model over sequences: calibrated on 6 of 24 steps, timed on one of 100."""
    src = work / "float.onnx"
    onnx.save(build(hidden), src)
    rng = np.random.default_rng(0)
    x = write_samples(work / "X", [rng.standard_normal((24, 1, hidden)).astype(np.float32)
                                   for _ in range(6)])
    h = write_samples(work / "h0", [np.zeros((1, hidden), np.float32)] * 6)
    config = work / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=X:{x},h0:{h}\n"
                      f"input_shape=X:24,1,{hidden}\n")
    feeds = {"X": rng.standard_normal((100, 1, hidden)).astype(np.float32),
             "h0": np.zeros((1, hidden), np.float32)}

    def run(session: ort.InferenceSession) -> Any:
        return session.run(None, feeds)

    def outputs(session: ort.InferenceSession) -> np.ndarray:
        return run(session)[1]  # Y: every step's state

    return src, config, run, outputs


CASES = {
    "streaming If, hidden 256 (200 steps)": lambda w: _streaming(w, 256),
    "streaming If, hidden 512 (200 steps)": lambda w: _streaming(w, 512),
    "Loop, hidden 256 (100 steps)": lambda w: _sequence(w, cf_models.loop_model, 256),
    "Scan, hidden 256 (100 steps)": lambda w: _sequence(w, cf_models.scan_model, 256),
    "Loop, hidden 128 (100 steps; below the body gate)":
        lambda w: _sequence(w, cf_models.loop_model, 128),
}


def measure(name: str, work: Path, rounds: int) -> dict[str, Any]:
    src, config, run, outputs = CASES[name](work)
    out = work / "q.onnx"
    report = ptqconv.convert(src, out, "PostTraining", config_file=config)
    kernels, floats = {}, {}
    for body in bodies(runtime.optimized(out).graph):
        ops = [n.op_type for n in body.graph]
        label = f"{body.node.op_type}.{body.attribute}"
        kernels[label] = {op: ops.count(op) for op in sorted(set(ops)) if integer_kernel(op)}
        floats[label] = sum(op in FLOAT_WEIGHT_OPS for op in ops)
    reference, quantized = _session(src), _session(out)
    cosine = _cosine(outputs(reference), outputs(quantized))
    for session in (reference, quantized):
        run(session)  # warm up
    times: dict[str, list[float]] = {"float": [], "quantized": []}
    ratios = []
    for r in range(rounds):
        order = (("float", reference), ("quantized", quantized))
        for label, session in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            run(session)
            times[label].append(time.perf_counter() - start)
        ratios.append(times["quantized"][-1] / times["float"][-1])
    quartiles = statistics.quantiles(ratios, n=4)
    return {"kernels": kernels, "float_weight_ops": floats, "cosine": cosine,
            "float_ms": statistics.median(times["float"]) * 1e3,
            "quantized_ms": statistics.median(times["quantized"]) * 1e3,
            "ratio": statistics.median(ratios), "iqr": [quartiles[0], quartiles[2]],
            "size_ratio": report.size_after / report.size_before,
            "summary": report.format()}


def section(tmp: Path, rounds: int, log: Callable[[str], None] = print) -> Section:
    """Every case measured in `tmp`, as one report section."""
    start = time.perf_counter()
    found: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(CASES):
        work = Path(tmp) / str(index)
        work.mkdir(parents=True)
        log(f"control flow: {name}")
        found[name] = measure(name, work, rounds)
    rows = []
    for name, r in found.items():
        kernels = "; ".join(f"{body}: " + (", ".join(f"{op} {n}" for op, n in ops.items())
                                           or "none")
                            for body, ops in r["kernels"].items() if ops or "If" not in body)
        rows.append([name, kernels, sum(r["float_weight_ops"].values()), f"{r['cosine']:.5f}",
                     fmt(r["float_ms"], 1), fmt(r["quantized_ms"], 1),
                     f"{r['ratio']:.2f} ({r['iqr'][0]:.2f}-{r['iqr'][1]:.2f})",
                     f"{r['size_ratio']:.3f}"])
    markdown = table(["model", "integer kernels in the bodies (onnxruntime)",
                      "float Conv/MatMul/Gemm left in bodies", "output cosine vs float",
                      "float ms", "quantized ms", "x float (IQR)", "size x float"], rows, 2)
    result = Section("controlflow", "Control flow: quantized If / Loop / Scan bodies",
                     markdown + f"\n\nLatency: 1 thread, median of {rounds} interleaved "
                     "rounds (per-round ratio quantized / float; IQR in brackets).",
                     {"cases": found, "rounds": rounds})
    result.seconds = time.perf_counter() - start
    return result


def run(ctx: Context) -> Section:
    """The `python -m bench` section (`--only controlflow`): 5 rounds with --quick, else 41."""
    return section(ctx.scratch("controlflow"), 5 if ctx.quick else 41, ctx.log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.controlflow", description=__doc__)
    parser.add_argument("--rounds", type=int, default=41, help="interleaved latency rounds")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the IQR needs two ratios)")
    return standalone("controlflow", argv, args.out_dir,
                      lambda tmp, log: section(tmp, args.rounds, log))


if __name__ == "__main__":
    sys.exit(main())
