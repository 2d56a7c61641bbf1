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


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "timed_folding: let a timing fold WeightQuant weights "
                            "at load (conversion._fold_if_faster)")


@pytest.fixture(autouse=True)
def _no_timed_folding(request, monkeypatch):
    # Whether a WeightQuant file is rewritten to fold at load follows this machine's timing
    # (conversion._fold_if_faster): tests that read a written model's structure must not.
    # Tests of the rule itself fake the timing and carry the marker.
    if "timed_folding" not in request.keywords:
        from ptqconv import conversion

        monkeypatch.setattr(conversion, "_fold_if_faster", lambda *args, **kwargs: None)


def scored_alike(monkeypatch, error: float, first_sample=None) -> None:
    """Every model AUTO or a later check scores has output error `error` on every held-out
    sample (against a float output of power 1): all candidates tie. `first_sample(model)`,
    when given and not None, is the model's error on the first held-out sample instead."""
    from ptqconv import post_training
    from ptqconv.evaluate.held_out import SampleErrors

    def output_error(model, samples, indices, references, threads):
        noise = np.full(len(indices), error)
        if first_sample is not None and indices[0] == 0 and (
                found := first_sample(model)) is not None:
            noise[0] = found
        return SampleErrors({n: noise for n in references},
                            {n: np.ones(len(indices)) for n in references})

    monkeypatch.setattr(post_training, "_output_error", output_error)
