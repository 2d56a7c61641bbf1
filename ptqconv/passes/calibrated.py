"""Passes that rewrite the graph from calibration statistics.

As NNCF's `get_statistic_points` / `apply`: a pass first declares the statistics it needs
(`statistic_points`), one streaming collection gathers those of every pass, and the pass is
then called with them (`calibrated`). A new pass adds its needs here without touching the
collector or the pipeline.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ptqconv.calibrate.statistics import (
    ChannelStatistics,
    Statistic,
    StatisticPoint,
    Statistics,
)
from ptqconv.qparams import Range

logger = logging.getLogger(__name__)


@dataclass
class MigrationResult(ir.passes.PassResult):
    """What a scale-migration pass did: the float range of each tensor it changed or made,
    and why each candidate it left alone was left alone."""

    technique: str = ""
    ranges: dict[str, Range] = field(default_factory=dict)
    migrated: list[str] = field(default_factory=list)  # activations
    left_alone: dict[str, str] = field(default_factory=dict)  # activation -> reason
    # Tensors the migrated model holds divided per channel: name -> Divided.
    divided: dict[str, Divided] = field(default_factory=dict)


@dataclass(frozen=True)
class Divided:
    """A tensor of the migrated model is the float model's divided by `factors` along `axis`."""

    factors: np.ndarray
    axis: int


@dataclass(frozen=True)
class Migrated:
    """What one migration did: the tensor now quantized in its group's place, its range, and
    the tensors it divided."""

    tensor: str
    range: Range
    divided: dict[str, Divided]


class CalibratedPass(ir.passes.InPlacePass):
    technique = ""  # what the summary calls it

    def __init__(self) -> None:
        super().__init__()
        self.statistics = Statistics({})
        self.excluded: frozenset[str] = frozenset()
        self.fixed: frozenset[str] = frozenset()

    @abstractmethod
    def statistic_points(self, model: ir.Model) -> list[StatisticPoint]:
        """The statistics this pass needs on `model`, collected before it is called."""

    def calibrated(self, statistics: Statistics, excluded: frozenset[str] = frozenset(),
                   fixed: frozenset[str] = frozenset()) -> CalibratedPass:
        """This pass with the collected `statistics`; tensors in `excluded` stay float and
        must not be touched, nor must the tensors and weights in `fixed`, whose grids are
        given (an imported encodings file)."""
        self.statistics, self.excluded, self.fixed = statistics, excluded, fixed
        return self


class MigrationPass(CalibratedPass):
    """Per-channel scale migration between activations and the weights that read them
    (`scale_migration`): each group found in the graph is migrated from the per-channel
    statistics of its activation, or left alone with the reason."""

    channels: Statistic  # the per-channel statistic of an activation, along its channel axis

    @abstractmethod
    def find(self, graph: ir.Graph) -> tuple[list[Any], dict[str, str]]:
        """The groups to migrate, and why each other candidate activation was passed over."""

    @abstractmethod
    def migrate(self, model: ir.Model, group: Any, stats: ChannelStatistics) -> Migrated | None:
        """Migrate `group`, or None when the migration is predicted to gain nothing."""

    @abstractmethod
    def touches(self, group: Any) -> set[str]:
        """The activations and weights migrating `group` would change."""

    def statistic_points(self, model: ir.Model) -> list[StatisticPoint]:
        return [StatisticPoint(g.activation, self.channels) for g in self.find(model.graph)[0]]

    def call(self, model: ir.Model) -> MigrationResult:
        groups, rejected = self.find(model.graph)
        result = MigrationResult(model, False, self.technique, left_alone=dict(rejected))
        for group in groups:
            moments = self.statistics.get(group.activation, self.channels)
            stats = moments.result() if moments is not None else None
            if stats is None or group.activation in self.excluded:
                result.left_alone[group.activation] = "not calibrated (stays float)"
                continue
            if self.touches(group) & self.fixed:
                result.left_alone[group.activation] = "its grids come from the encodings file"
                continue
            made = self.migrate(model, group, stats)
            if made is None:
                result.left_alone[group.activation] = "predicted to gain nothing"
                continue
            result.ranges[made.tensor] = made.range
            result.divided.update(made.divided)
            result.migrated.append(group.activation)
            result.modified = True
        for name, reason in result.left_alone.items():
            logger.debug("%s: %s left alone: %s", self.technique, name, reason)
        return result
