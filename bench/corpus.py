"""The real-model corpus (built by ../shared/corpus/build_corpus.sh): manifests, samples and
the metric each manifest names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


class CorpusModel:
    def __init__(self, directory: Path):
        self.dir = directory
        self.name = directory.name
        self.manifest = json.loads((directory / "manifest.json").read_text())
        self.inputs = self.manifest["inputs"]

    @property
    def model(self) -> Path:
        return self.dir / "model.onnx"

    def count(self, split: str) -> int:
        return self.manifest["splits"][split]["count"]

    def labels(self, split: str) -> list:
        return json.loads((self.dir / self.manifest["splits"][split]["labels"]).read_text())

    def sample(self, split: str, i: int) -> dict[str, np.ndarray]:
        return {
            x["name"]: np.fromfile(self.dir / split / x["dir"] / f"{i:06d}.bin",
                                   dtype=x["dtype"]).reshape(x["shape"])
            for x in self.inputs
        }

    def sample_files(self, split: str, i: int) -> dict[str, dict[str, Any]]:
        """Sample `i` of `split` as {input: {path, dtype, shape}}, for a child process."""
        return {x["name"]: {"path": str(self.dir / split / x["dir"] / f"{i:06d}.bin"),
                            "dtype": x["dtype"], "shape": x["shape"]} for x in self.inputs}

    def samples(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.count(split)):
            yield self.sample(split, i)

    def ini_config(self, method: str, path: Path, bias_correction: bool = False,
                   bits: int = 8, strategy: str = "MAX_MIN") -> Path:
        path.write_text(
            "[common_quant_param]\nquant_type=FULL_QUANT\n"
            f"bit_num={bits}\n{self._data()}"
            f"[full_quant_param]\nactivation_quant_method={method}\n"
            f"bias_correction={'true' if bias_correction else 'false'}\n"
            f"quant_strategy={strategy}\n"
            "activation_bit_num=8\n"  # W4A8 at bits=4
            "measure_latency=false\n")  # the bench times every output itself
        return path

    def auto_config(self, path: Path) -> Path:
        """ptqconv's default: only the calibration data (paths, count, input shapes); no
        activation_quant_method, bias_correction, equalize or smooth_quant, so AUTO picks."""
        path.write_text(self._data())
        return path

    def weight_config(self, path: Path, bits: int, keys: dict[str, str]) -> Path:
        """A WeightQuant config with the calibration data and `[weight_quant_param]` keys."""
        path.write_text(
            f"[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num={bits}\n{self._data()}"
            "[weight_quant_param]\n" + "".join(f"{k}={v}\n" for k, v in keys.items())
            + "measure_latency=false\n")  # conversion time is the algorithms' alone
        return path

    def _data(self) -> str:
        calib = ",".join(f"{x['name']}:{self.dir / 'calib' / x['dir']}" for x in self.inputs)
        shapes = ";".join(f"{x['name']}:{','.join(map(str, x['shape']))}" for x in self.inputs)
        return (f"[data_preprocess_param]\ncalibrate_path={calib}\n"
                f"calibrate_size={self.count('calib')}\ninput_shape={shapes}\n")


def models(corpus: Path, only: list[str] | None = None) -> list[CorpusModel]:
    found = sorted(p.parent for p in corpus.glob("*/manifest.json"))
    return [CorpusModel(d) for d in found if not only or d.name in only]


# --- metrics: float outputs vs quantized outputs on the eval split ---------------------------

Outputs = list[list[np.ndarray]]  # per sample, the model's outputs in order


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _ctc(indices: np.ndarray) -> list[int]:
    out, prev = [], -1
    for i in indices:
        if i != prev and i != 0:
            out.append(int(i))
        prev = i
    return out


def metric(m: CorpusModel, ref: Outputs, got: Outputs) -> tuple[str, float, str]:
    """(name of the primary metric, its value for `got`, a secondary figure as text)."""
    labels = m.labels("eval")
    name = m.name
    if name == "mobilenet_v2":
        agree = np.mean([r[0].argmax() == g[0].argmax() for r, g in zip(ref, got, strict=True)])
        cos = np.mean([_cos(r[0], g[0]) for r, g in zip(ref, got, strict=True)])
        return "top-1 agreement", float(agree), f"logit cos {cos:.4f}"
    if name == "all_minilm_l6_v2":
        cos = [_cos(r[0], g[0]) for r, g in zip(ref, got, strict=True)]
        return "embedding cosine (mean)", float(np.mean(cos)), f"min {min(cos):.4f}"
    if name == "ppocrv4_det":
        ious = []
        for r, g in zip(ref, got, strict=True):
            a, b = r[0] > 0.3, g[0] > 0.3
            union = (a | b).sum()
            if union:
                ious.append((a & b).sum() / union)
        mae = np.mean([np.abs(r[0] - g[0]).mean() for r, g in zip(ref, got, strict=True)])
        return "mask IoU (p>0.3)", float(np.mean(ious)), f"MAE {mae:.4f}"
    if name == "ppocrv4_rec":
        same = np.mean([_ctc(r[0][0].argmax(-1)) == _ctc(g[0][0].argmax(-1))
                        for r, g in zip(ref, got, strict=True)])
        return "CTC exact match vs float", float(same), ""
    if name == "ppocr_mobile_v2_cls":
        acc = np.mean([g[0].argmax() == lab["label"] for g, lab in zip(got, labels, strict=True)])
        agree = np.mean([r[0].argmax() == g[0].argmax() for r, g in zip(ref, got, strict=True)])
        return "accuracy", float(acc), f"agreement {agree:.3f}"
    if name == "silero_vad_16k_sequence":
        agree = np.mean([((r[0] > 0.5) == (g[0] > 0.5)).mean() for r, g in zip(ref, got,
                                                                                strict=True)])
        mae = np.mean([np.abs(r[0] - g[0]).mean() for r, g in zip(ref, got, strict=True)])
        return "decision agreement (p>0.5)", float(agree), f"MAE {mae:.4f}"
    if name == "mtcnn_pnet":
        agree = np.mean([((r[1][:, 1] > 0.6) == (g[1][:, 1] > 0.6)).mean()
                         for r, g in zip(ref, got, strict=True)])
        mae = np.mean([np.abs(r[1][:, 1] - g[1][:, 1]).mean() for r, g in zip(ref, got,
                                                                               strict=True)])
        return "face map agreement (p>0.6)", float(agree), f"MAE {mae:.4f}"
    if name in ("mtcnn_rnet", "mtcnn_onet"):
        prob = len(ref[0]) - 1  # face_prob is the last output
        acc = np.mean([(g[prob][0, 1] > 0.5) == bool(lab["label"])
                       for g, lab in zip(got, labels, strict=True)])
        agree = np.mean([(r[prob][0, 1] > 0.5) == (g[prob][0, 1] > 0.5)
                         for r, g in zip(ref, got, strict=True)])
        return "accuracy", float(acc), f"agreement {agree:.3f}"
    cos = np.mean([_cos(r[0], g[0]) for r, g in zip(ref, got, strict=True)])
    return "output cosine", float(cos), ""


def outputs(model: Path, m: CorpusModel) -> Outputs:
    """Every eval sample through `model` (onnxruntime CPU, default session options)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # some exported models carry unused initializers
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return [session.run(None, s) for s in m.samples("eval")]
