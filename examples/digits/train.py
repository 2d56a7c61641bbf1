"""Train a small residual CNN on scikit-learn's digits and export it as the ptqconv example.

Run from anywhere (paths are relative to this file):

    python examples/digits/train.py

Regenerates, next to this script:
    model.onnx                      float32 model, opset 17, input `input` [batch,1,8,8],
                                    output `logits` [batch,10]
    calib/input/NNNNNN.bin          first 100 training images (calibration set)
    calib/labels.json
    eval/input/NNNNNN.bin           all 200 held-out images (evaluation set)
    eval/labels.json

Every .bin is one raw little-endian float32 [1,1,8,8] tensor in C order, no header (256 bytes).
"""

from __future__ import annotations

import io
import json
import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
N_TRAIN = 1597
N_HELDOUT = 200
N_CALIB = 100
EPOCHS = 40
BATCH_SIZE = 32
LR = 1e-3
OPSET = 17


class DigitsNet(nn.Module):
    """Conv/ReLU stack with one residual Add, then MaxPool, Flatten and two Gemms.

    No BatchNorm on purpose: the exported graph then contains only ops a post-training
    quantizer has to handle directly (Conv, Relu, Add, MaxPool, Flatten, Gemm).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.conv1(x))
        # Residual Add joins two differently-scaled activations: the case quantizers get wrong.
        x = self.relu(self.conv2(a)) + a
        x = self.pool(self.relu(self.conv3(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        return self.fc2(x)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # One thread: float reductions then run in a fixed order, so the weights (and therefore
    # model.onnx) are byte-identical across reruns. The model is tiny, so this costs little.
    torch.set_num_threads(1)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_heldout, y_heldout); x is float32 [n,1,8,8] in [0,1]."""
    digits = load_digits()
    # Raw pixels are integers 0..16; /16 maps them onto [0,1], a range quantizers like.
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    # Fixed, stratified split over all 1,797 images.
    x_train, x_held, y_train, y_held = train_test_split(
        x, y, train_size=N_TRAIN, test_size=N_HELDOUT, stratify=y, random_state=SEED
    )
    return x_train, y_train, x_held, y_held


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)  # own generator: shuffling is independent
    model.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=gen).split(BATCH_SIZE):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def export_onnx(model: nn.Module, path: Path) -> None:
    buf = io.BytesIO()
    # Legacy TorchScript exporter on purpose: it emits plain opset-17 ONNX with no functions or
    # local domains, so silence its deprecation notice rather than print it on every run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    # Doc strings can carry source file paths/line numbers; drop them so the file is clean and
    # byte-identical wherever it is regenerated.
    proto.doc_string = ""
    proto.graph.doc_string = ""
    for node in proto.graph.node:
        node.doc_string = ""
    del proto.metadata_props[:]
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(proto.SerializeToString())


def check_onnx_matches(model: nn.Module, path: Path, x: np.ndarray) -> None:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for batch in (x[:1], x):  # batch 1 and a full batch: checks the dynamic batch dim too
        got = sess.run(["logits"], {"input": batch})[0]
        np.testing.assert_allclose(got, ref[: len(batch)], rtol=0, atol=1e-4)


def write_samples(root: Path, x: np.ndarray, y: np.ndarray) -> None:
    in_dir = root / "input"
    in_dir.mkdir(parents=True, exist_ok=True)
    for stale in in_dir.glob("*.bin"):  # a rerun with fewer samples must not leave extras
        stale.unlink()
    for i, img in enumerate(x):
        (in_dir / f"{i:06d}.bin").write_bytes(img.reshape(1, 1, 8, 8).astype("<f4").tobytes())
    (root / "labels.json").write_text(json.dumps([int(v) for v in y]) + "\n")


def main() -> None:
    seed_everything(SEED)
    x_train, y_train, x_held, y_held = load_split()

    model = DigitsNet()
    train(model, x_train, y_train)
    print(f"train accuracy:    {accuracy(model, x_train, y_train):.4f} ({len(y_train)} images)")
    print(f"held-out accuracy: {accuracy(model, x_held, y_held):.4f} ({len(y_held)} images)")

    onnx_path = HERE / "model.onnx"
    export_onnx(model, onnx_path)
    check_onnx_matches(model, onnx_path, x_held)
    print(f"wrote {onnx_path.relative_to(HERE.parent.parent)} (onnxruntime matches torch)")

    write_samples(HERE / "calib", x_train[:N_CALIB], y_train[:N_CALIB])
    write_samples(HERE / "eval", x_held, y_held)
    print(f"wrote {N_CALIB} calib and {len(y_held)} eval samples")


if __name__ == "__main__":
    main()
