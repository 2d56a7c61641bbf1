"""W8A8 accuracy on the real-model corpus: ptqconv (MAX_MIN, KL) vs onnxruntime quantize_static.

    python bench/accuracy.py CORPUS_DIR [--models a,b] [--out bench/accuracy.latest.md]

Both tools calibrate on the same `calib/` .bin files and are scored on `eval/` against the
float model, with the metric each manifest names. ptqconv runs with its defaults
(reduce_range, SmoothQuant) and each calibration method, with and without bias correction.
onnxruntime runs as quantize_static is usually run: QDQ, per-channel int8 weights, uint8
activations, MinMax calibration. Skips cleanly when the corpus directory does not exist.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import CorpusModel, metric, models

ort.set_default_logger_severity(3)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ptqconv_quantize(m: CorpusModel, method: str, out: Path, tmp: Path,
                     bias_correction: bool = False) -> float:
    from ptqconv.cli import main

    config = m.ini_config(method, tmp / f"{m.name}_{method}.ini", bias_correction)
    start = time.perf_counter()
    status = main([f"--modelFile={m.model}", f"--outputFile={out}",
                   "--quantType=PostTraining", f"--configFile={config}", "--quiet"])
    if status:
        raise RuntimeError(f"ptqconv failed on {m.name} ({method}) with status {status}")
    return time.perf_counter() - start


def ort_quantize(m: CorpusModel, out: Path) -> float:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = m.samples("calib")

        def get_next(self):
            return next(self.it, None)

    start = time.perf_counter()
    quantize_static(str(m.model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--models", default="")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.corpus.is_dir():
        print(f"corpus directory {args.corpus} not found; build it with "
              "../shared/corpus/build_corpus.sh; skipping")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for m in models(args.corpus, [s for s in args.models.split(",") if s]):
            ref = [session(m.model).run(None, s) for s in m.samples("eval")]
            row = {"model": m.name}
            variants = [("ptqconv MAX_MIN", "MAX_MIN", False), ("ptqconv KL", "KL", False),
                        ("ptqconv KL+bias corr.", "KL", True), ("ptqconv MSE", "MSE", False),
                        ("ptqconv MSE+bias corr.", "MSE", True)]
            for label, method, bias in variants:
                out = tmp / f"{m.name}_{method}_{bias}.onnx"
                try:
                    seconds = ptqconv_quantize(m, method, out, tmp, bias)
                    got = [session(out).run(None, s) for s in m.samples("eval")]
                    name, value, extra = metric(m, ref, got)
                    row[label] = (value, extra, seconds)
                except Exception as exc:  # report and go on with the other models
                    row[label] = (float("nan"), f"failed: {exc}", 0.0)
            out = tmp / f"{m.name}_ort.onnx"
            try:
                seconds = ort_quantize(m, out)
                got = [session(out).run(None, s) for s in m.samples("eval")]
                name, value, extra = metric(m, ref, got)
                row["onnxruntime"] = (value, extra, seconds)
            except Exception as exc:
                row["onnxruntime"] = (float("nan"), f"failed: {str(exc)[:80]}", 0.0)
            name, float_value, _ = metric(m, ref, ref)
            row["metric"], row["float"] = name, float_value
            rows.append(row)
            print(_row(row), flush=True)
    table = _table(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


COLUMNS = ["ptqconv MAX_MIN", "ptqconv KL", "ptqconv KL+bias corr.", "ptqconv MSE",
           "ptqconv MSE+bias corr.", "onnxruntime"]


def _cell(value: tuple[float, str, float]) -> str:
    v, extra, _ = value
    text = "failed" if np.isnan(v) else f"{v:.4f}"
    return f"{text} ({extra})" if extra else text


def _row(row: dict) -> str:
    return (f"| {row['model']} | {row['metric']} | {row['float']:.4f} | "
            + " | ".join(_cell(row[c]) for c in COLUMNS) + " |")


def _table(rows: list[dict]) -> str:
    head = ("| model | metric (vs float) | float | " + " | ".join(COLUMNS) + " |\n"
            + "|---|---|---:|" + "---:|" * len(COLUMNS))
    return "\n".join([head, *(_row(r) for r in rows)])


if __name__ == "__main__":
    main()
