"""Passes that rewrite the graph from calibration statistics.

As NNCF's `get_statistic_points` / `apply`: a pass first declares the statistics it needs
(`statistic_points`), one streaming collection gathers those of every pass, and the pass is
then called with them (`calibrated`). A new pass adds its needs here without touching the
collector or the pipeline.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

import onnx_ir as ir

from ptqconv.calibrate.statistics import StatisticPoint, Statistics
from ptqconv.qparams import Range


@dataclass
class MigrationResult(ir.passes.PassResult):
    """What a scale-migration pass did: the float range of each tensor it changed or made,
    and why each candidate it left alone was left alone."""

    technique: str = ""
    ranges: dict[str, Range] = field(default_factory=dict)
    migrated: list[str] = field(default_factory=list)  # activations
    left_alone: dict[str, str] = field(default_factory=dict)  # activation -> reason


class CalibratedPass(ir.passes.InPlacePass):
    technique = ""  # what the summary calls it

    def __init__(self) -> None:
        super().__init__()
        self.statistics = Statistics({})
        self.excluded: frozenset[str] = frozenset()

    @abstractmethod
    def statistic_points(self, model: ir.Model) -> list[StatisticPoint]:
        """The statistics this pass needs on `model`, collected before it is called."""

    def calibrated(self, statistics: Statistics,
                   excluded: frozenset[str] = frozenset()) -> CalibratedPass:
        """This pass with the collected `statistics`; tensors in `excluded` stay float and
        must not be touched."""
        self.statistics, self.excluded = statistics, excluded
        return self
