"""The CPU the quantized model will run on, and what that means for its weights.

onnxruntime's U8S8 GEMM kernels saturate int16 with full 8-bit weights on x86 CPUs without
VNNI; with AVX-512 VNNI, AVX-VNNI or ARM dot-product instructions they are exact
(docs/reference.md §3). So the weights' width follows the target: 7 bits where the kernels
saturate, 8 bits elsewhere.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# target_device values: ptqconv's CPU targets; `auto` (and MindSpore's CPU) detect the host.
TARGETS = ("auto", "x86_avx2", "x86_vnni", "arm64")
ALIASES = {"cpu": "auto"}
# MindSpore's other devices, which onnxruntime's CPU provider does not run.
FOREIGN = ("KIRIN", "NVGPU", "DSP", "ASCEND")


@dataclass(frozen=True)
class Target:
    name: str  # one of TARGETS but auto
    saturates: bool  # U8S8 kernels add products in int16: keep GEMM weights at 7 bits
    why: str  # for the summary

    def describe(self, bits: int = 8) -> str:
        """The target and the weights it gets at `bits` bits (reduce_range caps only 8)."""
        weights = ("7-bit GEMM weights (reduce_range)" if self.saturates and bits >= 8
                   else f"{min(bits, 8)}-bit weights")
        return f"{self.name} ({self.why}): {weights}"


def resolve(name: str) -> Target:
    """The target named `name` (`auto`: this machine's CPU)."""
    if name == "x86_avx2":
        return Target(name, True, "given: x86 without VNNI")
    if name == "x86_vnni":
        return Target(name, False, "given: x86 with AVX-512 VNNI or AVX-VNNI")
    if name == "arm64":
        return Target(name, False, "given: ARM with dot-product instructions")
    return detect()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a taskset or a container's cpuset
    counts, where os.cpu_count() would give the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def detect() -> Target:
    """This machine's CPU."""
    flags = _cpu_flags()
    machine = platform.machine().lower()
    cpu = cpu_name()
    if machine in ("aarch64", "arm64"):
        dot = "asimddp" in flags or "ASIMDDP" in _numpy_features()
        return Target("arm64", not dot, f"detected: {cpu}, "
                      f"{'dot-product' if dot else 'no dot-product'} instructions")
    vnni = bool({"avx512_vnni", "avx_vnni"} & flags) or bool(
        {"AVX512VNNI", "AVXVNNI"} & _numpy_features())
    if vnni:
        return Target("x86_vnni", False, f"detected: {cpu}, VNNI")
    return Target("x86_avx2", True, f"detected: {cpu}, no VNNI")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name (from `cpuinfo`, /proc/cpuinfo's text: read when None). Where a
    virtual machine hides the model number ("AMD EPYC"), the x86 family and model follow:
    they tell generations apart (family 25 model 1, Zen 3, ran the corpus models about twice
    as fast as the EPYC of this project's first measurements)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    name = (fields.get("model name") or fields.get("cpu model") or platform.processor()
            or platform.machine() or "unknown CPU")
    if not any(c.isdigit() for c in name) and fields.get("cpu family") and fields.get("model"):
        name += f" family {fields['cpu family']} model {fields['model']}"
    return name


def _numpy_features() -> set[str]:
    import numpy as np

    features = getattr(getattr(np, "_core", None), "_multiarray_umath", None)
    found = getattr(features, "__cpu_features__", {}) if features is not None else {}
    return {name for name, present in found.items() if present}
