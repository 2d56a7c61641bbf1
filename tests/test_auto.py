"""Measured choices: what the config leaves open is decided on held-out calibration samples."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import DIGITS

import ptqconv
from ptqconv.calibrate.observers import HistogramObserver, RemovalOutlierObserver
from ptqconv.calibrate.statistics import ChannelMoments, Folds, Statistic
from ptqconv.post_training import CANDIDATE_METHODS, TIE, _fold_samples, _folds, _scored_folds

MODEL = DIGITS / "model.onnx"
CALIB = DIGITS / "calib" / "input"


def config(tmp_path, body: str = "", size: int = 100) -> str:
    path = tmp_path / "c.ini"
    path.write_text(f"[data_preprocess_param]\ncalibrate_path=input:{CALIB}\n"
                    f"calibrate_size={size}\ninput_shape=input:1,1,8,8\n{body}")
    return str(path)


def test_auto_measures_what_the_config_leaves_open_and_keeps_only_what_helps(tmp_path):
    report = ptqconv.convert(MODEL, tmp_path / "q.onnx", "PostTraining",
                             config_file=config(tmp_path))
    s = report.post_training
    assert s.open_choices == ["method", "bias_correction", "equalize", "smooth_quant"]
    assert s.held_out == 25 and s.scored_folds == 1  # every 4th of 100
    methods = s.measured[:2 * len(CANDIDATE_METHODS)]
    assert [m.what for m in methods] == [
        f"range method {m}{bc}" for m in CANDIDATE_METHODS
        for bc in ("", " + bias correction")]
    # The lowest error wins unless it is a tie with a simpler candidate (listed first):
    # within TIE, or carried by one held-out sample (test_held_out, and the test below).
    least = min(m.error for m in methods if m.folds == methods[0].folds)
    best = next(m for m in methods if m.what == f"range method {s.method}"
                + (" + bias correction" if "bias correction" in s.chosen else ""))
    assert s.chosen.startswith(s.method)
    assert all(m.error > least + TIE for m in methods[:methods.index(best)]
               if m.folds == methods[0].folds)
    # Each technique tried after is kept only when it lowered the best error so far.
    error = best.error
    for m in s.measured[len(methods):]:
        if m.choice == s.chosen:
            assert m.error < error - TIE
            error = m.error
    assert "chosen by measurement" in report.format()
    # The summary names a migration only where it changed the model.
    migrated = {m.technique for m in s.migrations if m.migrated}
    for technique in ("equalization", "SmoothQuant"):
        assert (technique in s.chosen_shown) == (technique in s.chosen and technique in migrated)
    assert f"chosen by measurement: {s.chosen_shown} (" in report.format()
    # The chosen candidate's line is marked, and only it (its name in the header may also
    # name a candidate that differs from it by a technique turned off).
    marked = [line for line in report.format().splitlines() if "<- chosen" in line]
    chosen_line = next(m for m in s.measured if m.choice == s.chosen)
    # Within the tie margin of a lower one it says so (the simpler of two as good wins).
    least = min(m.error for m in s.measured if m.folds == max(x.folds for x in s.measured))
    tie = (f" (within {s.tie:g} of the lowest: a tie, the simpler wins)"
           if least < chosen_line.error <= least + s.tie else
           " (the lower errors rest on one held-out sample: a tie, the simpler wins)"
           if chosen_line.error > least + s.tie else "")
    assert marked == [f"    {chosen_line.what}: {chosen_line.error:.3g} <- chosen{tie}"]
    # A usable model: no warning. One whose chosen error is past 10 dB gets one, with what
    # to try (the W4A4 outputs of five CNNs in a sweep scored 0.8-1.4, silently).
    assert "warning:" not in report.format()
    poor = [dataclasses.replace(m, error=0.8) if m.choice == s.chosen else m
            for m in s.measured]
    report.post_training = dataclasses.replace(s, measured=poor)
    assert "warning: the chosen model's output error is 0.8 of the float outputs' power" in (
        report.format())
    assert "--accuracyThreshold checks it" in report.format()
    report.post_training = dataclasses.replace(s, measured=poor, activation_bits=4)
    assert "4-bit activations cost most: activation_bit_num=8" in report.format()


def test_explicit_keys_force_their_choice_and_are_not_measured(tmp_path):
    body = ("[full_quant_param]\nactivation_quant_method=KL\nbias_correction=false\n"
            "equalize=false\nsmooth_quant=true\n")
    report = ptqconv.convert(MODEL, tmp_path / "q.onnx", "PostTraining",
                             config_file=config(tmp_path, body))
    s = report.post_training
    assert (s.open_choices, s.measured, s.method) == ([], [], "KL")
    # Only bias correction open: the method is forced, the switch measured.
    body = "[full_quant_param]\nactivation_quant_method=MSE\nequalize=true\nsmooth_quant=true\n"
    s = ptqconv.convert(MODEL, tmp_path / "q2.onnx", "PostTraining",
                        config_file=config(tmp_path, body)).post_training
    assert s.open_choices == ["bias_correction"] and s.method == "MSE"
    assert [m.what for m in s.measured][:2] == ["range method MSE",
                                                "range method MSE + bias correction"]
    assert all(m.choice.startswith("MSE") for m in s.measured)


def test_one_sample_leaves_nothing_to_hold_out(tmp_path):
    report = ptqconv.convert(MODEL, tmp_path / "q.onnx", "PostTraining",
                             config_file=config(tmp_path, size=1))
    s = report.post_training
    assert s.measured == [] and s.method == "MSE"
    assert "chosen without measuring (too few samples to hold any out)" in report.format()


def test_small_sets_are_cross_validated_large_ones_score_one_capped_fold():
    assert _folds(1) == 0
    for samples in range(2, 400):
        folds = _folds(samples)
        scored = _scored_folds(samples, folds)
        held = [i for f in scored for i in _fold_samples(samples, folds, f)]
        assert len(set(held)) == len(held) and held
        if samples < 16:  # every fold, each scored with ranges from the others
            assert sorted(held) == list(range(samples))
        elif samples < 64:  # two folds
            assert len(scored) == 2 and len(held) >= samples // 2 - 1
        else:
            assert scored == (0,) and len(held) <= 64
            assert all(i % folds == 0 for i in held)


def test_small_sets_say_they_were_cross_validated(tmp_path):
    report = ptqconv.convert(MODEL, tmp_path / "q.onnx", "PostTraining",
                             config_file=config(tmp_path, size=6))
    s = report.post_training
    assert s.scored_folds == 4 and s.held_out == 6
    assert "4 folds, each scored with ranges from the others" in report.format()
    # Candidates halved away were scored on fewer folds: their errors say so, as they are
    # not comparable with the others' (one can look lower than a kept one's).
    dropped = [m for m in s.measured if m.folds < 4]
    assert dropped and all(
        f"{m.what}: {m.error:.3g} (dropped after {m.folds} of 4 folds, on which the kept ones "
        "scored lower)" in report.format() for m in dropped)


def _same(a, b) -> None:
    if isinstance(b, HistogramObserver):
        assert np.array_equal(a.hist, b.hist)  # with the values still waiting binned
    for key, value in b.__dict__.items():
        if key.startswith("_"):  # caches, hints and pending values of the accumulator's own
            continue
        got = a.__dict__[key]
        if isinstance(value, np.ndarray):
            assert np.allclose(got, value), key
        elif isinstance(value, float):
            assert got == pytest.approx(value), key
        else:
            assert got == value, key


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**31 - 1),
       st.sampled_from([Statistic(HistogramObserver), Statistic(RemovalOutlierObserver),
                        Statistic(ChannelMoments, (1,))]))
def test_folds_merge_into_one_accumulator_of_the_samples_they_hold(samples, k, seed,
                                                                    statistic):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((1, 3, 4, 4)).astype(np.float32) * rng.uniform(0.1, 10)
              for _ in range(samples)]
    folds = Folds(statistic, k)
    whole = statistic.create()
    for x in arrays:
        folds.update(x)
        whole.update(x)
    _same(folds.without(None), whole)
    for fold in range(k) if k > 1 else ():
        rest = statistic.create()
        for i, x in enumerate(arrays):
            if i % k != fold:
                rest.update(x)
        if any(i % k != fold for i in range(samples)):
            _same(folds.without(fold), rest)
    assert folds.without(None) is not folds.parts[0]


@pytest.mark.parametrize("seq, tried", [(32, True), (1024, False)])
def test_attention_matmuls_are_tried_float_only_where_they_are_light(tmp_path, seq, tried):
    """MatMuls of two activations (Q.K^T, probs.V) are measured in float where they do at
    most MAX_PRODUCT_SHARE of the GEMM work: 2s / (2s + 12 * hidden) of a BERT layer, 2.0% at
    32 tokens and hidden 256, 40% at 1024."""
    import onnx_ir as ir

    from bench.models import bert, normal_samples
    from ptqconv.passes.latency_plan import product_share
    from ptqconv.passes.qdq_plan import activation_products, plan_quantization
    from ptqconv.post_training import MAX_PRODUCT_SHARE

    hidden = 256
    src = bert(tmp_path / "bert.onnx", layers=1, hidden=hidden, heads=4, ffn=4 * hidden,
               seq=seq)
    model = ir.load(src)
    products = activation_products(model.graph)
    assert sorted(n.name for n in products) == ["l0_ctx", "l0_qk"]
    plan = plan_quantization(model.graph)
    head = hidden // 4
    # What calibration observes: the GEMM inputs.
    shapes = {n.inputs[0].name: (1, seq, hidden) for n in model.graph
              if n.op_type == "MatMul" and n not in products}
    shapes.update(l0_qT=(1, 4, seq, head), l0_kT=(1, 4, head, seq), l0_vT=(1, 4, seq, head),
                  l0_probs=(1, 4, seq, seq), l0_gelu=(1, seq, 4 * hidden))
    share = product_share(plan, shapes, products)
    assert share == pytest.approx(2 * seq / (2 * seq + 12 * hidden))
    assert (share <= MAX_PRODUCT_SHARE) == tried
    data = normal_samples(tmp_path / "hidden", 8, (1, seq, hidden))
    config = tmp_path / "c.ini"
    # latency_aware=false: every unit is a candidate, as on targets without the cost model.
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=hidden:{data}\n"
                      "[full_quant_param]\nlatency_aware=false\nmeasure_latency=false\n")
    report = ptqconv.convert(src, tmp_path / "q.onnx", "PostTraining", config_file=str(config))
    s = report.post_training
    flips = [m for m in s.measured if m.what.endswith("activation MatMuls float")]
    assert bool(flips) == tried
    if flips and s.chosen.endswith("activation MatMuls float"):
        assert flips[-1].error < min(m.error for m in s.measured if m not in flips) - TIE


def test_each_technique_is_scored_against_the_best_so_far_earlier_flips_included(
        tmp_path, monkeypatch):
    """Turning SmoothQuant off is scored on top of an accepted 'equalization off', and its
    acceptance keeps equalization off (errors faked: each flip lowers the error)."""
    from ptqconv import post_training
    from ptqconv.evaluate.held_out import SampleErrors

    def add(self, choice, fold):
        n = len(self.samples[fold])
        error = 1.0 - 0.1 * (not choice.equalize) - 0.2 * (not choice.smooth_quant)
        self.per_sample.setdefault(choice, {})[fold] = SampleErrors(
            {k: np.full(n, error) for k in self.references},
            {k: np.ones(n) for k in self.references})

    monkeypatch.setattr(post_training._Scorer, "add", add)
    monkeypatch.setattr(post_training.PostTraining, "_changes", lambda self, m, a, b: True)
    report = ptqconv.convert(MODEL, tmp_path / "q.onnx", "PostTraining",
                             config_file=config(tmp_path, size=40))
    s = report.post_training
    assert "SmoothQuant" not in s.chosen and "equalization" not in s.chosen, s.chosen
    whats = [m.what for m in s.measured]
    assert any(w.endswith("equalization off + SmoothQuant off") for w in whats), whats


@pytest.mark.parametrize("carried_by, chosen", [(1, "MAX_MIN"), (2, "MAX_MIN + bias correction")])
def test_a_lower_error_one_held_out_sample_carries_is_a_tie(tmp_path, monkeypatch, carried_by,
                                                            chosen):
    """MAX_MIN (listed first) is worse than every other candidate on `carried_by` held-out
    samples and as good on the rest: on one sample that is the sample's noise and the
    simpler MAX_MIN is kept; on two, the next candidate listed wins."""
    from ptqconv import post_training
    from ptqconv.evaluate.held_out import SampleErrors

    def add(self, choice, fold):
        n = len(self.samples[fold])
        noise = np.full(n, 1e-3)
        if choice.method == "MAX_MIN" and not choice.bias_correction:
            noise[:carried_by] = 5e-2
        errors = SampleErrors({k: noise for k in self.references},
                              {k: np.ones(n) for k in self.references})
        self.per_sample.setdefault(choice, {})[fold] = errors

    monkeypatch.setattr(post_training._Scorer, "add", add)
    report = ptqconv.convert(MODEL, tmp_path / "q.onnx", "PostTraining",
                             config_file=config(tmp_path))
    s = report.post_training
    assert s.method == "MAX_MIN" and s.chosen.startswith(chosen + " +")
    assert ("bias correction" in s.chosen) == (carried_by == 2)
    first = s.measured[0]
    assert first.what == "range method MAX_MIN" and first.error > min(
        m.error for m in s.measured) + TIE
    tie = " <- chosen (the lower errors rest on one held-out sample: a tie, the simpler wins)"
    assert (f"    {first.what}: {first.error:.3g}{tie}" in report.format()) == (carried_by == 1)
