"""Per-unit sensitivity: quantize one node unit at a time and rank units by the output error
each causes alone (AIMET's per-layer enable/disable sweep), so a user knows what to skip."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ptqconv.calibrate.collector import REAPPLIED_FUSIONS, session_options
from ptqconv.passes.qdq import QDQPass
from ptqconv.passes.qdq_plan import QuantPlan

MAX_SAMPLES = 16


def unit_plan(plan: QuantPlan, unit: ir.Node) -> QuantPlan:
    """The part of `plan` that quantizes `unit` alone: its tensors, weight, bias, constants."""
    names = {v.name for v in (*unit.inputs, *unit.outputs) if v is not None}
    names |= {plan.folded[n] for n in names if n in plan.folded}
    return QuantPlan(
        units=[unit],
        observe=[n for n in plan.observe if n in names],
        shared={n: root for n, root in plan.shared.items() if n in names},
        fixed={n: r for n, r in plan.fixed.items() if n in names},
        folded=plan.folded,
        weights=[w for w in plan.weights if w[0] is unit],
        biases=[b for b in plan.biases if b[2] is unit],
        constants=[c for c in plan.constants if c in names],
        skipped=plan.skipped,
    )


def rank_units(
    float_model: ir.Model,
    plan: QuantPlan,
    ranges: Mapping[str, tuple[float, float]],
    make_pass: Callable[[QuantPlan], QDQPass],
    samples: Sequence[Mapping[str, np.ndarray]],
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[str, str, float]]:
    """(node name, op type, output SQNR in dB with only that unit quantized), worst first.

    `plan` must have been made on `float_model`'s graph; each trial quantizes a fresh copy.
    """
    proto = ir.to_proto(float_model)
    index = {id(node): i for i, node in enumerate(float_model.graph)}
    reference = _run(proto.SerializeToString(), samples, threads)
    results = []
    for unit in plan.units:
        trial = ir.from_proto(proto)
        nodes = list(trial.graph)
        # The plan's node objects belong to `float_model`; map them onto the copy by position.
        sub = unit_plan(plan, unit)
        sub.units = [nodes[index[id(unit)]]]
        sub.weights = [(nodes[index[id(n)]], i, a) for n, i, a in sub.weights]
        sub.biases = [(nodes[index[id(n)]], i, nodes[index[id(u)]]) for n, i, u in sub.biases]
        sub.skipped = {nodes[index[id(n)]] for n in plan.skipped}
        make_pass(sub)(trial)
        outputs = _run(ir.to_proto(trial).SerializeToString(), samples, threads)
        signal = sum(float(np.square(r, dtype=np.float64).sum()) for r in reference)
        noise = sum(float(np.square(o.astype(np.float64) - r).sum())
                    for o, r in zip(outputs, reference, strict=True))
        sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf
        results.append((unit.name or f"{unit.op_type}#{index[id(unit)]}", unit.op_type, sqnr))
        if progress:
            progress(1)
    return sorted(results, key=lambda r: r[2])


def _run(model: bytes, samples: Sequence[Mapping[str, np.ndarray]],
         threads: int) -> list[np.ndarray]:
    session = ort.InferenceSession(model, session_options(threads),
                                   disabled_optimizers=REAPPLIED_FUSIONS,
                                   providers=["CPUExecutionProvider"])
    return [np.concatenate([o.ravel() for o in session.run(None, dict(s))]) for s in samples]


def write(directory: Path | None, ranking: list[tuple[str, str, float]],
          top: int = 10) -> list[str]:
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "sensitivity.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["node_name", "op_type", "output_sqnr_db_alone"])
            writer.writerows(ranking)
    lines = [f"  sensitivity ({len(ranking)} units, output SQNR with only that unit quantized; "
             "lowest first):"]
    lines += [f"    {name} ({op}): {sqnr:.1f} dB" for name, op, sqnr in ranking[:top]]
    if ranking:
        lines.append(f"    to keep the worst in float: --skipQuantNode={ranking[0][0]}")
    return lines
