"""Running the CLI as a user would, and checking that a failed run kept every promise: one
line on stderr, no traceback, inputs unmodified, nothing left behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort
from models import DIGITS, random_samples

from ptqconv.cli import main


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones included) with what it holds."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = "link to " + os.readlink(path)
        elif path.is_dir():
            found[name] = "directory"
        elif path.is_file():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[name] = "special"
    return found


def digits_workspace(root: Path, samples: int = 10, config: str = "") -> dict[str, Path]:
    """The shipped example copied into `root`: model, `samples` calibration files and a
    config naming them."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(DIGITS / "model.onnx", root / "m.onnx")
    (root / "calib").mkdir()
    for path in sorted((DIGITS / "calib" / "input").iterdir())[:samples]:
        shutil.copy(path, root / "calib" / path.name)
    (root / "c.ini").write_text("[data_preprocess_param]\ncalibrate_path=input:calib\n"
                                f"calibrate_size={samples}\ninput_shape=input:1,1,8,8\n"
                                + config)
    return {"model": root / "m.onnx", "config": root / "c.ini", "calib": root / "calib"}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def error_line(err: str) -> str:
    """The one line a failed run writes on stderr (progress lines aside)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith("ptqconv: ")
             or line.startswith("ptqconv: error: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("ptqconv: error: "), err
    return lines[0]


def optimized_ops(path: Path, tmp_path: Path) -> Counter:
    """The op types of the graph onnxruntime runs for the model file `path` (default
    options: every optimization, the fusions into integer kernels included)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def quantize_every_unit(src: Path, tmp_path: Path, samples: int = 8) -> tuple[Path, Path]:
    """`src` (one float input "x" of [1, 3, 16, 16]) converted by PostTraining with every unit
    quantized (no latency plan, no timing) on random samples: (the output, the samples)."""
    data = random_samples(tmp_path / "x", samples, seed=0)
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                      "[full_quant_param]\nlatency_aware=false\nmeasure_latency=false\n")
    out = tmp_path / "q.onnx"
    assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                 f"--configFile={config}"]) == 0
    return out, data


def fails(capsys, root: Path, args: list[str], status: int, *culprits: str) -> str:
    """Run `ptqconv ARGS`: exit `status`, one error line naming every culprit, and `root`
    exactly as before. Returns the line."""
    before = snapshot(root)
    got, _, err = cli(capsys, *args)
    line = error_line(err)
    assert got == status, line
    for culprit in culprits:
        assert culprit in line, line
    assert snapshot(root) == before
    return line


def subprocess_cli(args: list[str], tmpdir: Path, prelude: str = "",
                   preexec: Callable[[], None] | None = None) -> subprocess.Popen:
    """`ptqconv ARGS` in a child process with its own TMPDIR; `prelude` is Python run first
    (to slow a step down, or shorten the progress interval)."""
    code = ("import sys\n" + textwrap.dedent(prelude)
            + "\nfrom ptqconv.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, TMPDIR=str(tmpdir))
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=preexec)


def stop_when(process: subprocess.Popen, ready: Callable[[str], bool], signum: int,
              timeout: float = 60) -> tuple[int, str]:
    """Read the child's stderr until `ready(line)`, send `signum`, return (status, stderr)."""
    assert process.stderr is not None
    seen = []
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        seen.append(line)
        if ready(line):
            process.send_signal(signum)
            break
        assert time.monotonic() < deadline, "".join(seen)
    else:
        raise AssertionError(f"the child ended before it was ready: {''.join(seen)}")
    _, rest = process.communicate(timeout=timeout)
    return process.returncode, "".join(seen) + rest


STOP_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
