from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
ort.set_default_logger_severity(3)
# CI (the CI environment variable) draws the same examples every run, so that a red build
# is a change's doing; locally each run explores new ones (HYPOTHESIS_PROFILE=ci to replay).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else
                                     "default"))


def run_model(path, feeds: dict[str, np.ndarray], level=None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if level is not None:
        options.graph_optimization_level = level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture
def run():
    return run_model


@pytest.fixture(autouse=True)
def _short_latency_timings(monkeypatch):
    # No test asserts a timing, and a conversion's latency lines need only be there: the
    # half second a comparison lasts at least (runtime.MIN_SECONDS) is for real decisions.
    import ptqconv.runtime

    monkeypatch.setattr(ptqconv.runtime, "MIN_SECONDS", 0.0)
