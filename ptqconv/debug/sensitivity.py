"""Per-unit sensitivity: quantize one node unit at a time and rank units by the output error
each causes alone (AIMET's per-layer enable/disable sweep), so a user knows what to skip."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ptqconv import runtime
from ptqconv.evaluate.metrics import squared_error
from ptqconv.graph.naming import node_key
from ptqconv.passes.qdq import QDQPass
from ptqconv.passes.qdq_plan import PlannedBias, PlannedWeight, QuantPlan

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
        weights=[w for w in plan.weights if w.node is unit],
        biases=[b for b in plan.biases if b.unit is unit],
        constants=[c for c in plan.constants if c in names],
        skipped=plan.skipped,
    )


@dataclass(frozen=True)
class UnitSensitivity:
    node: str  # the unit's name (or op type and position)
    op_type: str
    output_sqnr_db: float  # of the model outputs with only this unit quantized
    key: str = ""  # graph.naming.node_key of the unit


def rank_units(
    float_model: ir.Model,
    plan: QuantPlan,
    make_pass: Callable[[QuantPlan], QDQPass],
    samples: Sequence[Mapping[str, np.ndarray]],
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[UnitSensitivity]:
    """Every unit of `plan` (made on `float_model`'s graph), worst first; each trial quantizes
    a fresh clone of `float_model`."""
    position = {node: i for i, node in enumerate(float_model.graph)}
    reference = _run(float_model, samples, threads)
    signal = sum(float(np.square(r, dtype=np.float64).sum()) for one in reference for r in one)
    results = []
    for unit in plan.units:
        trial = float_model.clone()
        nodes = {node_key(node): node for node in trial.graph}

        def mine(node: ir.Node, nodes: dict[str, ir.Node] = nodes) -> ir.Node:
            return nodes[node_key(node)]

        sub = unit_plan(plan, unit)
        sub = replace(
            sub, units=[mine(unit)],
            weights=[PlannedWeight(mine(w.node), w.index, w.axis) for w in sub.weights],
            biases=[PlannedBias(mine(b.node), b.index, mine(b.unit)) for b in sub.biases],
            skipped={mine(n) for n in plan.skipped})
        make_pass(sub)(trial)
        outputs = _run(trial, samples, threads)
        noise = sum(squared_error(r, o) for got, want in zip(outputs, reference, strict=True)
                    for o, r in zip(got, want, strict=True))
        sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf
        name = unit.name or f"{unit.op_type}#{position[unit]}"
        results.append(UnitSensitivity(name, unit.op_type, sqnr, node_key(unit)))
        if progress:
            progress(1)
    return sorted(results, key=lambda r: r.output_sqnr_db)


def _run(model: ir.Model, samples: Sequence[Mapping[str, np.ndarray]],
         threads: int) -> list[list[np.ndarray]]:
    """The outputs of every sample, in output order."""
    session = runtime.Session(model, threads, label="sensitivity", own_graph=True)
    return [list(session.run(s).values()) for s in samples]


CSV_NAME = "sensitivity.csv"


def write(path: Path, ranking: list[UnitSensitivity]) -> None:
    """The ranking as CSV at `path` (DIR/sensitivity.csv once moved into place)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["node_name", "op_type", "output_sqnr_db_alone"])
        writer.writerows((r.node, r.op_type, r.output_sqnr_db) for r in ranking)
