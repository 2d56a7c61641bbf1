"""The conversion: settings -> load -> WeightQuant or PostTraining -> save -> accuracy gate.

Every output (the model, its data file, the debug reports) is written into a staging area
beside its destination, loaded back in onnxruntime, gated, and only then moved into place:
a run that fails or is interrupted leaves nothing behind, and an output that onnxruntime
refuses is never reported as a success.
"""

from __future__ import annotations

import contextlib
import difflib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ptqconv import encodings, files, modelio, runtime
from ptqconv.accuracy_target import meet_target
from ptqconv.calibrate.dataset import (
    CalibrationSet,
    check_user_shapes,
    graph_inputs,
    model_inputs,
)
from ptqconv.debug import layer_report, sensitivity
from ptqconv.dynamic_quant import dynamic_quant
from ptqconv.errors import PtqError, PtqUsageError, shown
from ptqconv.evaluate import held_out
from ptqconv.evaluate.comparison import check_same_io, compare_sessions, gate_failures
from ptqconv.evaluate.metrics import output_error
from ptqconv.evaluate.run import random_sample
from ptqconv.graph.ops import fusion_parts, is_quantized
from ptqconv.passes.float16 import Float16ConstantsPass
from ptqconv.passes.fold_weight_dequantize import (
    FoldWeightDequantizePass,
    foldable,
    weight_dequantizers,
)
from ptqconv.passes.generated_names import value_names
from ptqconv.passes.latency_plan import CONV_OPS, LatencyPlan, cuts
from ptqconv.post_training import TIE, Built, PostTraining, Probed, weight_bytes
from ptqconv.report import (
    ConversionReport,
    DynamicCheck,
    DynamicSummary,
    Float16Summary,
    GateReport,
    InferredShape,
    LatencyCheck,
    PlanCheck,
    PostTrainingSummary,
    SampleError,
)
from ptqconv.runtime import Session
from ptqconv.settings import (
    AUTO,
    DEFAULT_QUANT_WEIGHT_CHANNEL,
    DEFAULT_QUANT_WEIGHT_SIZE,
    ConvertSettings,
    DataSource,
    DynamicQuantSettings,
    GateSettings,
    PostTrainingSettings,
    WeightQuantSettings,
)
from ptqconv.target import detect
from ptqconv.weight_only import weight_quant

ProgressFactory = Callable[[int, str], Callable[[int], None]]


def convert(settings: ConvertSettings,
            progress: ProgressFactory | None = None) -> ConversionReport:
    """Quantize `settings.model_file` into `settings.output_file` and report what was done.

    `progress(total, label)` may return a callback that is fed amounts of work done.
    """
    with contextlib.ExitStack() as scope:
        return _convert(settings, progress, scope)


class _Simplification:
    """PostTraining's simplification, run as load_model's onnxruntime check: the model is
    loaded in onnxruntime once, for both."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.path: Path | None = None
        self.refused: runtime.ModelRefused | None = None

    def __call__(self, path: Path, size: int) -> bool:
        try:
            self.path = modelio.simplify_with_onnxruntime(path, self.workdir, size)
        except runtime.ModelRefused as exc:
            self.refused = exc
            return False
        return True

    def result(self) -> Path:
        if self.path is None:  # onnx's checker passed the model onnxruntime refused
            assert self.refused is not None
            raise self.refused
        return self.path


def _convert(settings: ConvertSettings, progress: ProgressFactory | None,
             scope: contextlib.ExitStack) -> ConversionReport:
    start = time.perf_counter()
    report = ConversionReport(settings.model_file, settings.output_file,
                              settings.quant_type.value, settings.bit_num)
    simplification = None
    if isinstance(settings.mode, PostTrainingSettings):
        # The simplified model's weights stay on disk there (mapped, not copied) for as long
        # as any model built from it may be read: up to the accuracy-target repair.
        simplification = _Simplification(scope.enter_context(files.temporary_directory()))
    model = modelio.load_model(settings.model_file, onnxruntime_check=simplification)
    settings = _resolve_fp16(settings, model)
    model_files = modelio.model_files(settings.model_file, model)
    report.size_before = modelio.files_size(model_files)
    report.opset_before = model.opset_imports.get("", 1)
    refuse_quantized(model, settings.model_file)
    check_skip_names(model, settings)
    # Checked now, before any long work.
    eval_data = open_data(model, settings.model_file, settings.gate.data) if settings.gate \
        else None
    report.data = eval_data.format if eval_data is not None else None
    mode = settings.mode
    calibration = mode.calibration \
        if isinstance(mode, (PostTrainingSettings, WeightQuantSettings)) else None
    data = open_data(model, settings.model_file, calibration) if calibration else None
    if data is None and settings.input_shapes:  # only for timing: checked like data's
        check_user_shapes(graph_inputs(model.graph, settings.model_file),
                          dict(settings.input_shapes), "--inputShape / input_shape")
    weight_data = data if isinstance(mode, WeightQuantSettings) else None
    for source in (data, eval_data):
        if source is not None:
            report.inferred_shapes += inferred_shapes(source)
    if data is not None:
        report.identical_samples = {name: len(data) for name in data.identical}
        report.outlier_samples = list(data.outliers)
    files.refuse_inputs(planned_outputs(settings),
                        read_files(settings, model_files, data, eval_data))
    with files.Staging() as staging:
        pt = built = None
        if isinstance(mode, PostTrainingSettings):
            assert data is not None and simplification is not None
            report.data = data.format
            original_names = value_names(model.graph)
            del model
            runtime.release_memory()
            pt = PostTraining(mode, data, progress)
            if mode.latency_check:
                pt.probe = _float_plan_probe(settings, mode, data, report)
            built, report.post_training = pt.run(simplification.result(), original_names,
                                                 report.size_before)
            # The float weights were read for quantizing; unmapped, they do not add to the
            # peak of writing the model (a later rebuild maps them again).
            modelio.unmap_weights(built.prepared)
            model = built.model
            saved = _save(model, settings, report, staging)
        else:
            if isinstance(mode, DynamicQuantSettings):
                model, report.weights, residual, kept = dynamic_quant(model, mode)
                report.dynamic = DynamicSummary(mode.strategy, mode.target, mode.reduce_range,
                                                residual, kept)
            else:
                model, report.weights, report.weight_quant = weight_quant(
                    model, mode, settings.model_file.parent, progress, weight_data)
            saved = _save(model, settings, report, staging)
        del model
        saved = _never_grow(settings, report, model_files, staging, saved) or saved
        # A model the plan kept wholly float may be written unchanged: all-integer is still
        # timed against it. Otherwise a model written unchanged has nothing to check.
        if isinstance(mode, PostTrainingSettings) and mode.latency_check and (
                pt is not None and data is not None) and (
                not report.kept_input or report.post_training.latency_plan is not None):
            saved, built = _check_latency(pt, settings, report, data, staging, saved,
                                          model_files, built)
            if _dynamic_worth_trying(settings, mode, pt, report):
                assert built is not None
                saved = _check_dynamic(pt, settings, report, data, staging, saved, built)
        session = _loaded(saved, settings)
        if report.post_training is not None:
            _stage_debug(report.post_training, mode, staging)
        if eval_data is not None and settings.gate is not None:
            step = progress(len(eval_data), "accuracy gate") if progress else None
            report.gate = accuracy_gate(session, eval_data, settings, settings.gate, step)
            if report.gate.failures and pt is not None and not report.kept_input:
                del session
                session, built, saved = _meet_target(pt, settings, settings.gate, eval_data,
                                                     report, saved, staging, progress,
                                                     model_files, built)
        del session
        if isinstance(mode, PostTrainingSettings) and mode.encodings_out is not None:
            assert pt is not None and built is not None
            # The model written is float when nothing was worth quantizing: no encodings.
            doc = (encodings.document({}, {}, [], {}) if report.kept_input
                   else pt.encodings(built))
            try:
                encodings.write(staging.path(mode.encodings_out), doc)
            except OSError as exc:
                raise PtqError(f"--encodingsFile: cannot write {shown(mode.encodings_out)}: "
                               f"{files.os_reason(exc)}") from None
            report.encodings_file = mode.encodings_out
        # The models built are done with: free them (and the float weights they map) before
        # onnxruntime loads the float model and the written one side by side.
        pt = built = None
        runtime.release_memory()
        if isinstance(mode, PostTrainingSettings) and mode.measure_latency and (
                report.post_training is not None and data is not None) and (
                report.latency is None or report.target is not None):
            _measure_latency(settings, report, saved, data)
        elif isinstance(mode, WeightQuantSettings) and mode.measure_latency and \
                report.quantized:
            outputs = _measure_latency(settings, report, saved, data, at_load=True)
            folded = _fold_if_faster(settings, report, staging, saved)
            if folded is not None:
                saved = folded
                assert report.weight_quant is not None
                if report.weight_quant.tables_folded:  # not what the at-load timing ran
                    _measure_latency(settings, report, saved, data)
                else:  # the file runs as the at-load model did
                    _sample_error(settings, report, data, outputs or {}, runtime.AT_LOAD)
        elif isinstance(mode, DynamicQuantSettings) and mode.measure_latency and \
                report.quantized:
            _measure_latency(settings, report, saved, None)
        replaced = staging.commit()
    report.replaced = [p for p in replaced if p == settings.data_file]
    report.seconds = time.perf_counter() - start
    return report


def _measure_latency(settings: ConvertSettings, report: ConversionReport,
                     saved: modelio.SavedModel, data: CalibrationSet | None,
                     at_load: bool = False) -> dict[str, list[np.ndarray]] | None:
    """The written model timed against float, the way onnxruntime runs both files for a user,
    on a calibration sample (without data, a seeded random one in the shapes given).
    `at_load`: also timed with onnxruntime dequantizing constant weights once at load
    (runtime.DEQUANTIZE_AT_LOAD), as weight-only DequantizeLinear otherwise runs on every
    inference. A figure of the summary, never a reason to fail. Returns each model's
    outputs on the sample (None: not timed)."""
    models: dict[str, runtime.ModelSource] = {"float": settings.model_file,
                                              "quantized": saved.path}
    if at_load:
        models[runtime.AT_LOAD] = saved.path
    # The one dequantized at load holds float weights, like the float model.
    crowded = _crowded(report.size_before * (2 if at_load else 1) + report.size_after)
    if crowded:
        report.latency_skipped = crowded
        return
    try:
        sample = (next(iter(data)) if data is not None
                  else random_sample(model_inputs(settings.model_file, check=False),
                                     dict(settings.input_shapes)))
    except PtqUsageError as exc:  # a dynamic dimension or an input type it cannot invent
        why = str(exc).removeprefix("random inputs: ").split("; give")[0]
        report.latency_skipped = (f"no sample to time it on: {why}; --inputShape (or "
                                  "input_shape in [data_preprocess_param]) gives one")
        return
    outputs: dict[str, list[np.ndarray]] = {}
    try:
        report.latency = runtime.compare_latency(
            models, sample,
            session_config={runtime.AT_LOAD: runtime.DEQUANTIZE_AT_LOAD} if at_load else None,
            outputs=outputs)
    except runtime.ModelRefused as exc:
        if exc.label != "quantized":
            report.latency_skipped = str(exc)
            return
        # Checked at first without graph optimizations (`_loaded`): a model onnxruntime's
        # own optimizer then fails on is no output.
        raise PtqError(f"the quantized model for {shown(settings.output_file)}: onnxruntime "
                       f"cannot load it with its default options: {exc.reason}; nothing was "
                       "written") from None
    except PtqError as exc:
        report.latency_skipped = str(exc)
        return
    _sample_error(settings, report, data, outputs, "quantized")
    return outputs


def _sample_error(settings: ConvertSettings, report: ConversionReport,
                  data: CalibrationSet | None, outputs: dict[str, list[np.ndarray]],
                  label: str) -> None:
    """Weights alone have no held-out figure: the sample timed gives one, for free (the
    outputs of the model `label` against the float one's)."""
    if isinstance(settings.mode, PostTrainingSettings) or label not in outputs:
        return
    error = output_error(outputs["float"], outputs[label])
    if error is not None:
        report.sample_error = SampleError(
            error, "a calibration sample" if data is not None else "a seeded random input")


def _fold_if_faster(settings: ConvertSettings, report: ConversionReport,
                    staging: files.Staging, saved: modelio.SavedModel
                    ) -> modelio.SavedModel | None:
    """A weight-only model that ran slower than float as written, and faster with onnxruntime
    dequantizing its weights at load (the same interleaved timing, beyond the noise), is
    written with every weight's DequantizeLinear as the Cast -> Mul onnxruntime folds at
    load (`passes.fold_weight_dequantize`), which runs as the at-load timing did with no
    session option. Only where every weight folds: a model left half-folded would need a
    timing of its own."""
    latency = report.latency
    if latency is None or runtime.AT_LOAD not in latency.ms \
            or not latency.faster("float", "quantized") \
            or not latency.faster(runtime.AT_LOAD, "quantized"):
        return None
    if len(saved.files) > 1:
        # Its weights would be read lazily from the very data file the rewrite writes.
        return None
    model = modelio.load_model(saved.path, check=False)
    if not all(foldable(node) for node in weight_dequantizers(model.graph)):
        return None
    done = FoldWeightDequantizePass()(model)
    # Saved as it is: its float constants are already what --fp16 made them.
    saved = modelio.save_model(model, settings.output_file, staging)
    report.size_after = modelio.files_size(saved.files)
    assert report.weight_quant is not None
    report.weight_quant.folded_for_speed = (done.folded,
                                            latency.ms["quantized"] / latency.ms["float"])
    report.weight_quant.tables_folded = done.tables
    report.latency = _relabelled(latency, {"float": "float", "quantized": runtime.AT_LOAD})
    return saved


def _crowded(need: int) -> str:
    """Why models of `need` bytes in all cannot be loaded side by side for timing: every
    session holds its weights, and timing must leave room for the rest of the machine
    (at most half of what the kernel calls available); "" when they can."""
    available = runtime.over_half_of_memory(need)
    if available is None:
        return ""
    def size(n: int) -> str:
        return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"

    return (f"the models side by side need about {size(need)}, more than half of the "
            f"{size(available)} available")


def _check_latency(pt: PostTraining, settings: ConvertSettings, report: ConversionReport,
                   data: CalibrationSet, staging: files.Staging, saved: modelio.SavedModel,
                   sources: list[Path], built: Built | None,
                   ) -> tuple[modelio.SavedModel, Built | None]:
    """Timings on the machine converting, for the target it is, decide what the latency cost
    model predicted. Where the cost model kept units float (x86_avx2), the all-integer model
    is built and timed beside the plan, and written instead when it runs faster. Elsewhere
    every unit is quantized, and where the cost model would keep units float its plan is
    built and timed beside that model and float, and written instead when it runs faster
    (two timings, by the margin): unless all-integer is slower than float, only if as
    accurate on AUTO's held-out samples, as _check_plan weighs all-integer. A model that
    cannot be timed stays as it is. The timings of the model written become the summary's
    latency (docs/decisions.md, latency check off x86_avx2)."""
    summary = report.post_training
    assert summary is not None
    sample = next(iter(data))
    if _crowded(report.size_before + 2 * report.size_after):
        return saved, built
    if summary.latency_plan is not None:
        if not summary.latency_plan.keys:
            return saved, built
        return _check_plan(pt, settings, report, sample, staging, saved, sources, built)
    errors: tuple[float, float] | None = None
    tied = False  # the plan kept as no slower and more accurate
    tried = 1  # plans timed: the cost model's, and its cuts where it did not win
    try:
        found = pt.latency_planned()
        if found is None:  # the cost model keeps no unit float: float is all to beat
            first = runtime.compare_latency(
                {"float": settings.model_file, "quantized": saved.path}, sample)
            summary.latency_check = LatencyCheck(first)
            report.latency = first
            return saved, built
        latency, planned = found
        whole = len(latency.kept_float)
        models = {"float": settings.model_file, "quantized": saved.path,
                  "planned": planned.model}
        keep, first, second, why = _faster_twice(models, sample, "planned", "quantized")
        # Every cut is one more model held and timed side by side.
        pieces = len(cuts(latency))
        if not keep and pieces and not _crowded(
                report.size_before + (2 + pieces) * report.size_after):
            latency, planned, keep, second, why, tried = _fastest_cut(
                pt, settings, sample, saved, latency, planned)
        slower = first.faster("float", "quantized")
        if keep and not slower and pt.scoring is not None:
            assert built is not None
            integer_error, planned_error, better = _weigh(pt, built.model, planned.model)
            errors = (planned_error, integer_error)
            if better:
                keep, why = False, "more held-out error"
        elif (not keep and pt.scoring is not None and not second.faster("quantized", "planned")
              and not second.faster("float", "planned")):
            # No faster, but no slower than all-integer or float beyond the noise: the more
            # accurate is written, as _check_plan weighs it (ppocrv4_det on VNNI: the plan's
            # held-out error a tenth of all-integer's, its timing 0.59-0.76x against
            # 0.70-0.76x; docs/decisions.md, latency check off x86_avx2).
            assert built is not None
            planned_error, integer_error, better = _weigh(pt, planned.model, built.model)
            if better:
                keep, why, errors, tied = True, "", (planned_error, integer_error), True
    except PtqError:
        return saved, built
    report.post_training = pt.adopt(latency, planned, summary) if keep else summary
    report.post_training.latency_check = LatencyCheck(
        _written(first, "quantized"), second, len(latency.kept_float), keep, why, errors,
        tied, whole if len(latency.kept_float) < whole else 0, tried)
    report.latency = _written(second, "planned" if keep else "quantized")
    if not keep:
        return saved, built
    saved = _save(planned.model, settings, report, staging)
    return _never_grow(settings, report, sources, staging, saved) or saved, planned


def _fastest_cut(pt: PostTraining, settings: ConvertSettings, sample: dict,
                 saved: modelio.SavedModel, latency: LatencyPlan, planned: Built,
                 ) -> tuple[LatencyPlan, Built, bool, runtime.Latency, str, int]:
    """Where the cost model's plan did not run faster than all-integer: it and its cuts
    (`PostTraining.latency_cuts`), timed together with float and all-integer, the fastest
    of them (not a cut less accurate than a whole plan that ties all-integer); whether
    that runs faster than all-integer (the two-timing rule: the second
    timing has float, all-integer and it only), its last timing with it as "planned", why
    not, and how many plans were timed (docs/decisions.md, cuts of the latency plan)."""
    plans = {"planned": (latency, planned),
             **{f"cut {i}": cut for i, cut in enumerate(pt.latency_cuts(latency))}}
    models: dict[str, runtime.ModelSource] = {"float": settings.model_file,
                                              "quantized": saved.path}
    models.update((label, built.model) for label, (_, built) in plans.items())
    timed = runtime.compare_latency(models, sample)
    # From the whole plan down, a smaller cut (fewer units float, usually less accurate)
    # only where its median is faster by the margin and it ran faster in significantly more
    # rounds than not: near-equal timings keep the larger one (ppocrv4_rec: cuts of a
    # quarter and three quarters of its plan timed 5% faster by noise, CTC exact match
    # 0.98 -> 0.82; docs/decisions.md, cuts of the latency plan).
    best = "planned"
    for label in reversed(list(plans)[1:]):  # cuts, largest first
        if (timed.ms[label] * runtime.LATENCY_MARGIN < timed.ms[best]
                and timed.faster(label, best, 1.0)):
            best = label
    # Nor where the whole plan, no slower than all-integer, is more accurate on AUTO's
    # held-out samples: it would win that tie (ppocrv4_rec on Zen 4: a cut timed faster
    # once, CTC exact match 0.98 -> 0.82). A whole plan all-integer beats leaves the cut
    # (mobilenet_v2: its cut, 0.9953, against all-integer's 0.9905; docs/decisions.md, cuts
    # of the latency plan).
    if (best != "planned" and pt.scoring is not None
            and not timed.faster("quantized", "planned")
            and _weigh(pt, planned.model, plans[best][1].model)[2]):
        best = "planned"
    latency, planned = plans[best]
    timed = _relabelled(timed, {"float": "float", "quantized": "quantized", "planned": best})
    why = timed.not_faster("planned", "quantized")
    if why:
        return latency, planned, False, timed, why, len(plans)
    models = {"float": settings.model_file, "quantized": saved.path, "planned": planned.model}
    second = runtime.compare_latency(models, sample)
    why = second.not_faster("planned", "quantized")
    return (latency, planned, not why, second, f"a second timing: {why}" if why else "",
            len(plans))


def _check_plan(pt: PostTraining, settings: ConvertSettings, report: ConversionReport,
                sample: dict, staging: files.Staging, saved: modelio.SavedModel,
                sources: list[Path], built: Built | None,
                ) -> tuple[modelio.SavedModel, Built | None]:
    """The cost model's plan (written) against the all-integer model, timed together with
    float; all-integer is written when it runs faster by the margin, beyond the noise, and,
    where AUTO scored candidates, is as accurate on its held-out samples (within TIE): it
    quantizes what the plan keeps float, and speed is not bought with accuracy, as among
    AUTO's other candidates (docs/decisions.md, latency check)."""
    summary = report.post_training
    assert summary is not None and summary.latency_plan is not None
    units = len(summary.latency_plan.kept_float)
    errors: tuple[float, float] | None = None
    one_sample = False  # the plan's lower error rests on one held-out sample: a tie
    if pt.probed is not None and pt.probed.slower:  # settled before AUTO scored anything
        report.post_training.plan_check = PlanCheck(
            pt.probed.timed, units, False,
            f"slower than the {pt.probed.slower}; timed with AUTO's first candidate, so no "
            "other was scored", None, True)
        report.latency = _written(pt.probed.timed, "planned")
        return saved, built
    try:
        latency, integer = pt.all_integer()
        models = {"float": settings.model_file, "planned": saved.path, "integer": integer.model}
        if pt.plan_float:
            # The plan is the float model: the quantized one asked for is written unless
            # the plan runs faster at all, beyond the noise, twice (the cost model's
            # prediction, measured here before it costs the user their quantized model).
            slower, timed = _slower_twice(models, sample, "integer")
            keep, why = not slower, f"slower than the {slower}" if slower else ""
        else:
            keep, _, timed, why = _faster_twice(models, sample, "integer", "planned")
        if keep and pt.scoring is not None and not pt.plan_float:
            assert built is not None
            planned_error, integer_error, better = _weigh(pt, built.model, integer.model)
            errors = (planned_error, integer_error)
            if better:
                keep, why = False, "more held-out error"
            one_sample = errors[1] > errors[0] + TIE
    except PtqError:
        return saved, built
    report.post_training = pt.adopt(latency, integer, summary) if keep else summary
    report.post_training.plan_check = PlanCheck(timed, units, keep, why, errors, pt.plan_float,
                                                one_sample and keep)
    report.latency = _written(timed, "integer" if keep else "planned")
    if not keep:
        return saved, built
    report.kept_input = ""  # the float model was written for the plan, not for this one
    saved = _save(integer.model, settings, report, staging)
    return _never_grow(settings, report, sources, staging, saved) or saved, integer


def _weigh(pt: PostTraining, written: ir.Model, faster: ir.Model) -> tuple[float, float, bool]:
    """The held-out errors of the model written and of a faster one that would replace it,
    pooled, and whether the written one is more accurate by AUTO's rule (a lower error that
    no single held-out sample carries, beyond TIE)."""
    written_errors, faster_errors = pt.held_out_errors(written), pt.held_out_errors(faster)
    assert written_errors is not None and faster_errors is not None
    return (held_out.pooled(written_errors), held_out.pooled(faster_errors),
            held_out.beats(written_errors, faster_errors, TIE))


GEMM_OPS = frozenset({"MatMul", "Gemm"})  # what DynamicQuant quantizes (convs stay float)


def _float_plan_probe(settings: ConvertSettings, mode: PostTrainingSettings,
                      data: CalibrationSet, report: ConversionReport,
                      ) -> Callable[[ir.Model, Callable[[], tuple[ir.Model, ir.Model]]],
                                    Probed | None]:
    """PostTraining.probe: where the latency plan keeps every unit float, the start choice's
    all-integer model timed against the float model and the plan's, as _check_plan times the
    chosen one (_slower_twice), before AUTO scores all-integer candidates: when it runs
    slower, the scores could change nothing (ppocr_mobile_v2_cls: 10.8 s of conversion, 8 of
    them AUTO's; docs/decisions.md, float plan probe). Not where DynamicQuant's model is a
    candidate, which is weighed on AUTO's scores."""
    sample = next(iter(data))
    dynamic = _dynamic_possible(settings, mode)

    def probe(model: ir.Model, build: Callable[[], tuple[ir.Model, ir.Model]],
              ) -> Probed | None:
        if dynamic and weight_bytes(model, GEMM_OPS) > weight_bytes(model, CONV_OPS):
            return None
        if _crowded(3 * report.size_before):
            return None
        plan, integer = build()
        try:
            slower, timed = _slower_twice(
                {"float": settings.model_file, "planned": plan, "integer": integer}, sample,
                "integer")
        except PtqError:
            return None
        return Probed(slower, timed)

    return probe


def _dynamic_possible(settings: ConvertSettings, mode: PostTrainingSettings) -> bool:
    """AUTO at 8 bits, free to write any model (no accuracy target to repair against, no
    encodings to export or replay, no per-layer report), whose settings DynamicQuant's
    model keeps (its weights are per channel, its embedding tables int8)."""
    return (mode.dynamic_candidate and mode.method == AUTO and mode.bit_num == 8
            and mode.activation_bits == 8 and mode.per_channel and mode.embedding_quant
            and mode.quant_strategy != "GPTQ" and settings.gate is None
            and mode.encodings_out is None and mode.encodings_in is None
            and mode.debug_dir is None and not mode.sensitivity)


def _dynamic_worth_trying(settings: ConvertSettings, mode: PostTrainingSettings,
                          pt: PostTraining, report: ConversionReport) -> bool:
    """_dynamic_possible, with candidates scored."""
    return (_dynamic_possible(settings, mode)
            # A float model written for the latency plan is no reason: there is one to beat.
            and (not report.kept_input or pt.plan_float)
            and pt.scoring is not None
            # DynamicQuant leaves convs float: where their weights weigh as much, it is no
            # candidate (and the float model is not loaded again for it).
            and pt.float_weight_bytes(GEMM_OPS) > pt.float_weight_bytes(CONV_OPS))


def _check_dynamic(pt: PostTraining, settings: ConvertSettings, report: ConversionReport,
                   data: CalibrationSet, staging: files.Staging, saved: modelio.SavedModel,
                   built: Built) -> modelio.SavedModel:
    """DynamicQuant's model as AUTO's last candidate (_dynamic_worth_trying says where):
    scored on the held-out samples like the static model written, and timed against it.
    Written instead when it is more accurate (beyond TIE) and not slower than the static
    model or float, or as accurate and faster (runtime.Latency.faster, twice). Where the
    latency plan kept every unit float and that float model was written, it is the quantized
    model asked for, as all-integer is: written unless the float plan runs faster, twice."""
    summary = report.post_training
    assert summary is not None
    plan_written = pt.plan_float and not (summary.plan_check is not None
                                          and summary.plan_check.kept_integer)
    model = modelio.load_model(settings.model_file, check=False)
    mode = settings.mode
    assert isinstance(mode, PostTrainingSettings)
    dynamic, records, _, _ = dynamic_quant(model, DynamicQuantSettings(
        8, DEFAULT_QUANT_WEIGHT_SIZE, DEFAULT_QUANT_WEIGHT_CHANNEL, mode.target,
        mode.reduce_range, skip=mode.skip))
    if not any(r.quantized for r in records):
        return saved
    if plan_written:
        return _dynamic_over_float(pt, settings, report, data, staging, saved, built, dynamic)
    try:
        dynamic_errors = pt.held_out_errors(dynamic)
        # The chosen candidate's fold errors are, as a rule, no lower than the written
        # model's (calibrated on the held-out samples too): a model worse than them is
        # refused without scoring the written one (BERT-base: 4 s).
        chosen = pt.chosen_errors
        static_errors = (chosen if chosen is not None and dynamic_errors is not None
                         and held_out.beats(chosen, dynamic_errors, TIE)
                         else pt.held_out_errors(built.model))
    except PtqError:
        return saved
    assert static_errors is not None and dynamic_errors is not None
    # Both ways the AUTO rule: a lower error that one held-out sample carries is a tie.
    static_error, dynamic_error = held_out.pooled(static_errors), held_out.pooled(dynamic_errors)
    if held_out.beats(static_errors, dynamic_errors, TIE):
        summary.dynamic_check = DynamicCheck(static_error, dynamic_error, None,
                                             why="more held-out error")
        return saved
    one_sample = abs(static_error - dynamic_error) > TIE  # and yet a tie
    models = {"float": settings.model_file, "written": saved.path, "dynamic": dynamic}
    sample = next(iter(data))
    try:
        if held_out.beats(dynamic_errors, static_errors, TIE):
            one_sample = False
            # More accurate, as AUTO picks among the static candidates: kept unless it runs
            # slower than the static model, or than float, beyond the noise.
            timed = runtime.compare_latency(models, sample)
            slower = ("written" if timed.faster("written", "dynamic")
                      else "float" if timed.faster("float", "dynamic") else "")
            keep = not slower
            why = (f"slower than the {'static' if slower == 'written' else 'float'} model"
                   if slower else "")
        else:  # as accurate: it has to be faster
            keep, _, timed, why = _faster_twice(models, sample, "dynamic", "written")
            why = f"not faster: {why}" if not keep else ""
    except PtqError:
        return saved
    summary.dynamic_check = DynamicCheck(static_error, dynamic_error, timed, keep, why,
                                         one_sample=one_sample)
    if not keep:
        return saved
    report.latency = _written(timed, "dynamic")
    return _save(dynamic, settings, report, staging)


def _dynamic_over_float(pt: PostTraining, settings: ConvertSettings, report: ConversionReport,
                        data: CalibrationSet, staging: files.Staging,
                        saved: modelio.SavedModel, built: Built, dynamic: ir.Model,
                        ) -> modelio.SavedModel:
    """_check_dynamic where the written model is the latency plan's float one."""
    summary = report.post_training
    assert summary is not None
    try:
        dynamic_error = pt.held_out_error(dynamic)
        static_error = pt.held_out_error(built.model)
        assert static_error is not None and dynamic_error is not None
        models = {"float": settings.model_file, "written": saved.path, "dynamic": dynamic}
        slower, timed = _slower_twice(models, next(iter(data)), "dynamic")
    except PtqError:
        return saved
    why = f"slower than the {slower}" if slower else ""
    summary.dynamic_check = DynamicCheck(static_error, dynamic_error, timed, not slower, why,
                                         over_float=True)
    if slower:
        return saved
    report.kept_input = ""
    report.latency = _written(timed, "dynamic")
    return _save(dynamic, settings, report, staging)


def _faster_twice(models: dict[str, runtime.ModelSource], sample: dict, a: str, b: str,
                  ) -> tuple[bool, runtime.Latency, runtime.Latency, str]:
    """Whether `a` runs faster than `b` (Latency.faster) in two comparisons of fresh
    sessions, the first and the last timing, and why not: a session can run a few percent
    slow for the whole of one comparison (mobilenet_v2: one switch in five from one
    comparison; docs/decisions.md, latency timings), which a second one rarely repeats. The
    second runs only when the first would change the model."""
    first = runtime.compare_latency(models, sample)
    why = first.not_faster(a, b)
    if why:
        return False, first, first, why
    second = runtime.compare_latency(models, sample)
    why = second.not_faster(a, b)
    return not why, first, second, f"a second timing: {why}" if why else ""


def _slower_twice(models: dict[str, runtime.ModelSource], sample: dict, candidate: str,
                  ) -> tuple[str, runtime.Latency]:
    """Whether the quantized `candidate` runs slower than any float model of `models` (the
    others: float and the latency plan's float rewrite) at all, beyond the noise, in two
    comparisons of fresh sessions (the second only when the first finds it): what it is
    slower than ("" when not; "float model" or "float plan"), and the last timing."""
    def slower_than(timed: runtime.Latency) -> str:
        return next((("float model" if label == "float" else "float plan")
                     for label in models if label != candidate
                     and timed.faster(label, candidate, 1.0)), "")

    timed = runtime.compare_latency(models, sample)
    if not slower_than(timed):
        return "", timed
    timed = runtime.compare_latency(models, sample)
    return slower_than(timed), timed


def _written(timed: runtime.Latency, label: str) -> runtime.Latency:
    """The float and `label` timings of a check, as the summary's latency of the written
    model (the same interleaved runs)."""
    return _relabelled(timed, {"float": "float", "quantized": label})


def _relabelled(timed: runtime.Latency, labels: dict[str, str]) -> runtime.Latency:
    """The timings of `labels`' values under its keys (the same interleaved runs; their
    rounds where every one kept them)."""
    rounds = ({new: timed.rounds[old] for new, old in labels.items()}
              if all(old in timed.rounds for old in labels.values()) else {})
    return runtime.Latency({new: timed.ms[old] for new, old in labels.items()}, timed.runs,
                           timed.threads, timed.cpu, rounds)


def _never_grow(settings: ConvertSettings, report: ConversionReport, sources: list[Path],
                staging: files.Staging, saved: modelio.SavedModel) -> modelio.SavedModel | None:
    """A PostTraining model with nothing quantized (bodies that stay float, units the latency
    plan keeps float) must not come out bigger than the float one. The float rewrite is the
    graph onnxruntime runs fastest (hard-swish as HardSigmoid * x fuses into the Conv), so it
    is first written in its leanest form (modelio.lean_rewrite); if that is still bigger, the
    float model is written, unchanged. A model with
    integer kernels is kept, bigger or not: a tiny one pays more for its Q/DQ parameters than
    its int8 weights save. WeightQuant and DynamicQuant that quantized no weight write the
    float model unchanged when their rewrite came out bigger."""
    summary = report.post_training
    quantized = (report.quantized if summary is None
                 else summary.weights_quantized or summary.quantize_nodes)
    if report.size_after <= report.size_before or len(sources) > 1 or quantized:
        return None
    if summary is not None:
        lean = modelio.lean_rewrite(saved, settings.model_file)
        if lean is not None and modelio.files_size(lean.files) <= report.size_before:
            report.size_after = modelio.files_size(lean.files)
            return lean
    report.kept_input = (f"the {'quantized' if summary is not None else 'rewritten'} model "
                         f"took {report.size_after} bytes, more than the float model's "
                         f"{report.size_before}: the float model was written unchanged")
    saved = modelio.copy_model(settings.model_file, settings.output_file, staging)
    report.size_after = report.size_before
    report.opset_after = report.opset_before
    report.fp16 = None
    return saved


def _meet_target(pt: PostTraining, settings: ConvertSettings, gate: GateSettings,
                 data: CalibrationSet, report: ConversionReport, saved: modelio.SavedModel,
                 staging: files.Staging, progress: ProgressFactory | None,
                 sources: list[Path], built: Built | None,
                 ) -> tuple[Session, Built | None, modelio.SavedModel]:
    """Keep the most harmful units float until the gate passes; stage that model instead.
    Returns the session of the model staged last, what was built for it and where it is."""
    assert report.gate is not None
    repaired_built, target = meet_target(pt, settings.model_file, data, gate, report.gate,
                                         progress)
    report.target = target
    repaired = repaired_built.model if repaired_built is not None else None
    if repaired is not None:
        built = repaired_built
        sample = next(iter(data))
        target.size_before = report.size_after
        target.cpu = detect().why.removeprefix("detected: ")
        # Interleaved, before the repaired model replaces the first one on disk (one model
        # after the other, 10 runs each, put a float model at 1.65x itself).
        latency: dict[str, float] = {}
        if pt.settings.measure_latency:
            with contextlib.suppress(PtqError):
                latency = dict(runtime.compare_latency(
                    {"float": settings.model_file, "quantized": saved.path,
                     "written": repaired}, sample, gate.threads).ms)
        saved = _save(repaired, settings, report, staging)
        # The summary describes the model written: with every unit float, never bigger than
        # the float model (_never_grow reads it).
        assert report.post_training is not None and repaired_built is not None
        report.post_training = pt.describe(repaired_built, report.post_training)
        saved = _never_grow(settings, report, sources, staging, saved) or saved
        target.latency_ms = latency
        target.size_after = report.size_after
    session = _loaded(saved, settings)
    if repaired is not None:
        report.gate = accuracy_gate(session, data, settings, gate)
    return session, built, saved


def _resolve_fp16(settings: ConvertSettings, model: ir.Model) -> ConvertSettings:
    """--fp16 not given: on for a model that stores its float constants in float16. They
    are computed in float32 (the simplification folds their Casts), and what stays float
    would be written float32, twice its size: a LLaMA-style float16 export whose latency
    plan keeps 25 MatMuls float came out at 1.08x its size (docs/decisions.md, float16
    models)."""
    if settings.fp16 is not None:
        return settings
    names = modelio.float16_constants(model)
    return replace(settings, fp16=bool(names), fp16_names=names or None)


def float16(model: ir.Model, names: frozenset[str] | None = None) -> Float16Summary:
    """--fp16: the float32 constants that stay float stored in float16 (only `names`, the
    model's own float16 constants, when given)."""
    result = Float16ConstantsPass(names)(model)
    return Float16Summary(result.converted, result.float32_bytes, result.kept,
                          names is not None)


def _save(model: ir.Model, settings: ConvertSettings, report: ConversionReport,
          staging: files.Staging) -> modelio.SavedModel:
    if settings.fp16:
        report.fp16 = float16(model, settings.fp16_names)
    report.opset_after = model.opset_imports.get("", 1)
    saved = modelio.save_model(model, settings.output_file, staging)
    report.size_after = modelio.files_size(saved.files)
    return saved


def _loaded(saved: modelio.SavedModel, settings: ConvertSettings) -> Session:
    """The written model in an onnxruntime session, or PtqError: onnxruntime is where the
    output will run, so a model it refuses is a failure, never a success. PostTraining
    output loads with the default options (the fusions into integer kernels included);
    WeightQuant output without optimizations (fusing a multi-gigabyte model costs more
    than it checks)."""
    level = "all" if isinstance(settings.mode, PostTrainingSettings) or settings.gate \
        else "disable"
    threads = settings.gate.threads if settings.gate else 1
    try:
        return Session(saved.path, threads, level,
                       label=f"the quantized model for {shown(settings.output_file)}")
    except PtqError as exc:
        # onnx's checker passes some models onnxruntime refuses (duplicate node names):
        # then the model given is the one to blame.
        try:
            Session(settings.model_file, 1, "disable", label=shown(settings.model_file))
        except PtqError as given:
            raise PtqError(f"{given}; nothing was written") from None
        raise PtqError(f"{exc}; nothing was written") from None


def _stage_debug(summary: PostTrainingSummary, mode: PostTrainingSettings,
                 staging: files.Staging) -> None:
    """The layer report and the sensitivity ranking, written beside the model's staging."""
    directory = mode.debug_dir
    if directory is None:
        return
    try:
        if summary.layer_report is not None:
            layer_report.save(summary.layer_report,
                              staging.path(directory / layer_report.CSV_NAME),
                              staging.path(directory / layer_report.JSON_NAME))
        if summary.sensitivity is not None:
            sensitivity.write(staging.path(directory / sensitivity.CSV_NAME),
                              summary.sensitivity)
    except OSError as exc:
        raise PtqError(f"--debugDir: cannot write in {shown(directory)}: "
                       f"{files.os_reason(exc)}") from None


def planned_outputs(settings: ConvertSettings) -> list[tuple[str, Path]]:
    """Every file the run may write, with the flag that names it."""
    outputs = [("--outputFile", settings.output_file),
               ("--outputFile's data file", settings.data_file)]
    mode = settings.mode
    if isinstance(mode, PostTrainingSettings) and mode.encodings_out is not None:
        outputs.append(("--encodingsFile", mode.encodings_out))
    if isinstance(mode, PostTrainingSettings) and mode.debug_dir is not None:
        names = [layer_report.CSV_NAME, layer_report.JSON_NAME]
        if mode.sensitivity:
            names.append(sensitivity.CSV_NAME)
        outputs += [("--debugDir", mode.debug_dir / name) for name in names]
    seen = files.Identity()
    for flag, path in outputs:
        other = seen.find(path)
        if other is not None:
            raise PtqUsageError(f"{flag}: {shown(path)} is also written as {other}; "
                                "choose another path")
        seen.add(path, flag)
    return outputs


def read_files(settings: ConvertSettings, model_files: list[Path],
               *sources: CalibrationSet | None) -> list[tuple[str, Path]]:
    """Every file the run reads, described for messages."""
    read = [("--modelFile", model_files[0])]
    read += [("external data of --modelFile", path) for path in model_files[1:]]
    if settings.config_file is not None:
        read.append(("--configFile", settings.config_file))
    mode = settings.mode
    if isinstance(mode, PostTrainingSettings) and mode.encodings_in is not None:
        read.append(("encodings_path", mode.encodings_in.path))
    for source in sources:
        if source is not None:
            read += [(f"a sample of input {name!r} ({source.what})", path)
                     for name, paths in source.files.items() for path in paths]
    return read


def refuse_quantized(model: ir.Model, model_file: Path) -> None:
    """ptqconv quantizes float models: one already quantized (QDQ from another tool or from
    quantization-aware training, or integer kernels) would be quantized on top of its
    rounding, or left as it is under a report that says it was converted."""
    found = Counter(node.op_type for graph in model.graphs() for node in graph
                    if is_quantized(node))
    if found:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(found.items(), key=lambda x: -x[1])[:3])
        raise PtqError(f"{shown(model_file)} is quantized already ({ops}"
                       f"{' ...' if len(found) > 3 else ''}): give ptqconv the float model "
                       "(onnxruntime runs this one as it is)")


def check_skip_names(model: ir.Model, settings: ConvertSettings) -> None:
    """Every --skipQuantNode / skip_quant_node name must match a node name or an op type of
    the model: a misspelt name would otherwise quantize the node it meant to keep float."""
    known = {node.name for graph in model.graphs() for node in graph if node.name}
    known |= {node.op_type for graph in model.graphs() for node in graph}
    for name, where in settings.skip_given:
        fused = fusion_parts(name)
        if name in known or (fused is not None and fused[0] in known):
            continue  # the second: a name onnxruntime gave a fusion (--sensitivity prints it)
        # Exporters' names hold the module path (/fc2/Gemm for fc2): names that contain the
        # one given come first, then the close ones.
        holding = sorted((n for n in known if name.lower() in n.lower()), key=len)[:3]
        near = holding or difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else \
            "; give node names or op types of the model"
        raise PtqUsageError(f"{where}: {name!r} matches no node name or op type of "
                            f"{shown(settings.model_file)}{hint}")


def open_data(model: ir.Model, model_file: Path, source: DataSource) -> CalibrationSet:
    """The samples of `source` for the inputs of the loaded `model`, all checked."""
    return CalibrationSet.open(graph_inputs(model.graph, model_file), source.paths,
                               source.size, dict(source.shapes), what=source.what,
                               layout=source.layout, image=source.image,
                               count_given=source.size_given)


def inferred_shapes(data: CalibrationSet) -> list[InferredShape]:
    """The shapes read from a file's size, which the summary states."""
    return [InferredShape(data.what, spec.name, spec.dtype.name, data.shapes[spec.name],
                          data.files[spec.name][0], axis, data.shortest.get(spec.name))
            for spec in data.inputs if (axis := data.axes.get(spec.name)) is not None]


def accuracy_gate(quantized: Session, data: CalibrationSet, settings: ConvertSettings,
                  gate: GateSettings, progress: Callable[[int], None] | None = None,
                  ) -> GateReport:
    """Compare the written model with the float one on held-out samples (MindSpore's
    benchmark figures) and say why it misses the thresholds, if it does."""
    reference = Session(settings.model_file, gate.threads, "all",
                        label=f"--modelFile {shown(settings.model_file)}")
    check_same_io(quantized, reference)
    comparisons = compare_sessions(quantized, reference, data, progress)
    return GateReport(len(data), comparisons,
                      gate_failures(comparisons, gate.accuracy_threshold, gate.cosine_threshold,
                                    gate.names))
