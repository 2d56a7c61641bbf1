"""The summary printed at the end of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ptqconv.passes.weight_quant import WeightRecord


@dataclass
class ConversionReport:
    model_file: Path
    output_file: Path
    quant_type: str
    bit_num: int
    size_before: int = 0
    size_after: int = 0
    seconds: float = 0.0
    opset_before: int = 0
    opset_after: int = 0
    weights: list[WeightRecord] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # extra lines from the quantization mode
    gate_failures: list[str] = field(default_factory=list)  # accuracy gate: why it failed

    @property
    def passed(self) -> bool:
        return not self.gate_failures

    @property
    def quantized(self) -> list[WeightRecord]:
        return [w for w in self.weights if w.quantized]

    @property
    def skipped(self) -> list[WeightRecord]:
        return [w for w in self.weights if not w.quantized]

    def format(self, max_skipped: int = 20) -> str:
        ratio = self.size_after / self.size_before if self.size_before else 0.0
        storages = sorted({w.storage for w in self.quantized})
        lines = [f"{self.quant_type} {self.bit_num}-bit: {self.model_file} -> {self.output_file}"]
        if self.quant_type == "WeightQuant":
            lines += [
                f"  weights quantized: {len(self.quantized)}"
                + (f" (stored as {', '.join(storages)})" if storages else ""),
                f"  weights skipped:   {len(self.skipped)}",
            ]
        lines += self.details
        for w in self.skipped[:max_skipped]:
            lines.append(f"    {w.name} [{w.op_type} {'x'.join(map(str, w.shape))}]: {w.reason}")
        if len(self.skipped) > max_skipped:
            lines.append(f"    ... and {len(self.skipped) - max_skipped} more")
        if self.opset_after != self.opset_before:
            lines.append(f"  opset: {self.opset_before} -> {self.opset_after}")
        lines.append(
            f"  size: {_mb(self.size_before)} -> {_mb(self.size_after)} ({ratio:.3f} of float)"
        )
        lines.append(f"  time: {self.seconds:.2f} s")
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
