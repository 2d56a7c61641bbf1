"""What a conversion did, as data, and the summary text printed at the end of a run."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptqconv import qparams
from ptqconv.calibrate.dataset import OutlierSample, SampleFormat
from ptqconv.calibrate.observers import KL_SQNR_FLOOR_DB
from ptqconv.calibrate.ranges import SENTINEL_RANGE
from ptqconv.debug.layer_report import LayerReport
from ptqconv.debug.sensitivity import UnitSensitivity
from ptqconv.errors import shown
from ptqconv.evaluate.metrics import OutputComparison, model_mean_bias_percent
from ptqconv.passes.bias_correction import Correction
from ptqconv.passes.gptq import GPTQSummary
from ptqconv.passes.latency_plan import LatencyPlan
from ptqconv.passes.qdq import SHALLOW_DEPTH
from ptqconv.passes.residual_sum import ResidualSum
from ptqconv.passes.weight_quant import WeightRecord
from ptqconv.plain_data import plain
from ptqconv.runtime import AT_LOAD, DEQUANTIZE_AT_LOAD, Latency
from ptqconv.target import Target


@dataclass(frozen=True)
class Migration:
    """One scale-migration technique (equalization, SmoothQuant): the activations it changed
    and why it left each other candidate alone."""

    technique: str
    migrated: list[str]
    left_alone: dict[str, str]


@dataclass(frozen=True)
class Measured:
    """One candidate scored on held-out calibration samples."""

    what: str  # how it differs from where the search started ("range method KL + ...")
    choice: str  # the whole choice scored
    error: float  # the model outputs' noise-to-signal ratio against the float model
    folds: int = 1  # how many folds it was scored on


@dataclass(frozen=True)
class BodySummary:
    """One If / Loop / Scan body: what runs on integers there, and why the rest stays float."""

    body: str  # "Loop time_loop.body"
    units: int
    weight_ops: int  # quantized weight ops (Conv, Gemm, MatMul)
    integer_kernels: dict[str, int]  # after onnxruntime's optimization, by op type
    kept_float: dict[str, str]  # weight op -> why it stays float
    reason: str = ""  # why the whole body stays float, when it does


@dataclass(frozen=True)
class ImportSummary:
    """Which grids came from an imported encodings file and which were made here."""

    path: Path
    version: str
    activations: int  # on the file's grids
    regridded: int  # the file's range on ptqconv's grid (wider than uint8)
    weights: int
    float_tensors: int  # kept float by a float encoding
    float_ops: int  # weight ops kept float by a float encoding of their weight
    calibrated: int  # activations the file does not name, calibrated as usual
    computed: int  # weights the file does not name, from their values
    unused: dict[str, str]  # entry -> why
    derived: dict[str, str] = field(default_factory=dict)  # entries that follow from others
    choices: str = ""  # replayed from a file ptqconv wrote
    saturating: int = 0  # imported weight grids wider than this CPU's U8S8 kernels take


@dataclass(frozen=True)
class LatencyCheck:
    """Where latency_aware was left to a target the cost model was not measured on: the
    all-integer model timed against float on a calibration sample, beside the cost model's
    plan where that keeps units float (conversion._check_latency)."""

    integer: Latency  # "float" and "quantized" (all-integer), the first timing
    planned: Latency | None = None  # "float", "quantized", "planned"; None: no plan to time
    planned_float_units: int = 0  # units the plan keeps float
    kept_plan: bool = False
    why_kept: str = ""  # why the faster-looking model was not written (runtime.not_faster)
    # Held-out errors (plan, all-integer), where AUTO scored candidates and the plan ran
    # faster than an all-integer model that was not slower than float, or no slower (tied).
    errors: tuple[float, float] | None = None
    # The plan kept as no slower than all-integer beyond the noise and more accurate.
    tied: bool = False
    # Where a cut of the cost model's plan timed fastest: the units of the whole plan (0: the
    # whole plan did), and how many plans were timed (conversion._fastest_cut).
    cut_from: int = 0
    plans_timed: int = 1


@dataclass(frozen=True)
class DynamicCheck:
    """AUTO's last candidate, where MatMul/Gemm weights dominate: DynamicQuant's model (int8
    weights, activations quantized by onnxruntime at run time), scored on the held-out
    samples like the static one and timed against it; written when it is more accurate and
    not slower, or as accurate and faster (conversion._check_dynamic)."""

    static_error: float
    dynamic_error: float
    timed: Latency | None  # "float", "written" (static), "dynamic"; None: not timed
    written: bool = False
    why: str = ""  # why it was not written
    # The model it was weighed against is the latency plan's float one (static_error is
    # that float rewrite's): written unless that runs faster.
    over_float: bool = False
    # The errors differ by more than the tie, but the lower one rests on one held-out
    # sample (evaluate.held_out.beats): weighed as a tie, on speed.
    one_sample: bool = False

    def line(self) -> str:
        weighed = "float plan" if self.over_float else "static model"
        dynamic, static = distinct(self.dynamic_error, self.static_error)
        errors = (f"held-out error {dynamic} against the {weighed}'s {static}"
                  + (" (the lower rests on one held-out sample: a tie)" if self.one_sample
                     else ""))
        timed = ""
        if self.timed is not None:
            ms = self.timed.ms
            timed = (f", {ms['dynamic'] / ms['float']:.2f}x float against "
                     f"{ms['written'] / ms['float']:.2f}x ({self.timed.runs} interleaved runs, "
                     f"{self.timed.cpu})")
        if self.written:
            instead = " of the float plan, not slower" if self.over_float else ""
            return (f"  dynamic quantization (MatMul/Gemm weights int8, activations quantized "
                    f"at run time) written instead{instead}: {errors}{timed}; the lines above "
                    f"describe the {weighed} it replaced (dynamic_candidate=false keeps it)")
        return f"  dynamic quantization tried: {errors}{timed}: kept the {weighed} ({self.why})"


@dataclass(frozen=True)
class PlanCheck:
    """Where the cost model kept units float for speed and the target is the machine
    converting: its plan timed against the all-integer model on a calibration sample."""

    timed: Latency  # "float", "planned" and "integer"
    planned_float_units: int  # units the plan keeps float
    kept_integer: bool  # all-integer ran faster and was written
    why_kept: str = ""  # why the plan was kept (runtime.Latency.not_faster, or accuracy)
    # Held-out output error of the plan and of all-integer, where it was faster and AUTO
    # scored candidates (None: not scored).
    errors: tuple[float, float] | None = None
    # The plan keeps every unit float: all-integer is written unless the plan runs faster.
    plan_float: bool = False
    # all-integer was written though its error is above the plan's by more than the tie:
    # the plan's lower error rests on one held-out sample (evaluate.held_out.beats).
    one_sample: bool = False


@dataclass
class PostTrainingSummary:
    method: str
    samples: int
    bit_num: int
    activation_bits: int
    per_channel: bool
    target: Target
    # Values of each tensor a sample that KL / MSE histograms binned, and the tensors that
    # had more (0: none sampled).
    histogram_values: int
    histogram_sampled: int
    reduce_range: bool
    units: int  # node units quantized
    kl_refused: int
    migrations: list[Migration]
    sentinels: list[str]  # observed tensors kept float for their mask-like range
    activation_ranges: int
    quantize_nodes: int
    weights_quantized: int
    weight_grid: qparams.Grid | None
    shallow_8bit: int = 0  # weights of shallow convs kept in 8 bits below 8
    # weights whose scale was raised so that their int32 bias holds (near-constant inputs)
    bias_widened: int = 0
    embedding_tables: list[WeightRecord] = field(default_factory=list)  # quantized per row
    residual_sum: ResidualSum | None = None  # SkipLayerNormalization fusion, measured
    # op type -> activations run as integer kernels they have none of their own
    integer_activations: dict[str, int] = field(default_factory=dict)
    float_hard_swish: int = 0  # float hard-swishes after a DequantizeLinear, as HardSwish
    smoothing_undone: int = 0  # SmoothQuant undone: no MatMul reading the tensor quantized
    # Constant W and R of LSTM / GRU / RNN nodes, which stay float (no static int8 kernel).
    recurrent_float: int = 0
    latency_plan: LatencyPlan | None = None  # None: latency_aware=false
    latency_check: LatencyCheck | None = None  # all-integer against the cost model's plan
    plan_check: PlanCheck | None = None  # the cost model's plan against all-integer
    dynamic_check: DynamicCheck | None = None  # AUTO: DynamicQuant's model against it
    bias_corrections: list[Correction] | None = None  # None: not asked for
    layer_report: LayerReport | None = None
    sensitivity: list[UnitSensitivity] | None = None
    chosen: str = ""  # the method and the techniques the model was built with
    # `chosen` without the migrations that found nothing to change in this model.
    chosen_shown: str = ""
    measured: list[Measured] = field(default_factory=list)  # in the order they were tried
    held_out: int = 0  # calibration samples the candidates were scored on
    scored_folds: int = 0  # folds of the samples scored, each with ranges from the others
    open_choices: list[str] = field(default_factory=list)  # what the settings left open
    gptq: GPTQSummary | None = None  # quant_strategy=GPTQ
    bodies: list[BodySummary] = field(default_factory=list)  # of If / Loop / Scan
    unobserved: list[str] = field(default_factory=list)  # planned, never ran in calibration
    min_max_only: int = 0  # body tensors whose range is their min/max whatever the method
    imported: ImportSummary | None = None  # encodings_path
    # AUTO's tie margin: a candidate within it of the lowest error counts as as good, and the
    # simpler one is chosen.
    tie: float = 0.0
    skipped: list[str] = field(default_factory=list)  # nodes skip_quant_node kept float
    # The accuracy target's repair rebuilt the model written: the candidates measured (and
    # GPTQ's layers) describe the model before it, which the summary then says.
    repaired: bool = False
    # This machine's U8S8 kernels saturate 8-bit weights: figures measured here (AUTO's
    # scores, the gate) include that, whatever the target.
    host_saturates: bool = False


@dataclass(frozen=True)
class DynamicSummary:
    strategy: str  # ALWC
    target: Target
    reduce_range: bool  # 7-bit weights against the U8S8 GEMM's int16 saturation
    residual_sum: ResidualSum | None = None  # SkipLayerNormalization fusion, measured
    # constant weights of ops that stay float, by kind ("Conv", "GRU/RNN")
    float_weights: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Float16Summary:
    converted: int  # float32 constants stored in float16
    float32_bytes: int  # their size before
    kept: int  # float32 constants float16 cannot hold
    from_model: bool = False  # --fp16 not given: the model stores its own in float16


@dataclass
class WeightQuantSummary:
    """What the weight algorithms of a WeightQuant run did."""

    strategy: str  # MAX_MIN (round to nearest) or GPTQ
    per_channel: bool
    block_size: int
    bias_correction: bool
    gptq: GPTQSummary | None = None
    low_bit_recipe: bool = False  # block_size left out at 1-4 bits: blocks, 8-bit tables
    depthwise_8bit: int = 0  # depthwise conv weights kept in 8 bits beside blocks
    shallow_8bit: int = 0  # weights of shallow convs written on the 8-bit grid below 8 bits
    # Output noise-to-signal on the calibration samples with shallow convs at the bits asked
    # and at 8; None: not measured (set, or nothing to measure on).
    shallow_errors: tuple[float, float] | None = None
    shallow_unmeasured: str = ""  # why the calibration samples could not decide it
    # Relu / Clip behind Gemm weights MatMulNBits takes, as Max / Min (passes.matmulnbits_relu)
    activations_unfused: int = 0
    # Weights rewritten to fold at load because the model ran slower than float as written
    # (conversion._fold_if_faster): how many, and that timing's ratio to float.
    folded_for_speed: tuple[int, float] | None = None
    tables_folded: int = 0  # with them, embedding tables dequantized whole before the Gather
    weight_corrections: int = 0  # weights whose parameters took MindSpore's correction
    bias_corrections: list[Correction] | None = None  # None: no calibration data
    equalize_chains: int = 0  # Conv -> Relu -> Conv chains found
    # 1 - output cosine on the calibration samples without and with equalization (rounded
    # to nearest); None: no calibration data to measure on.
    equalize_errors: tuple[float, float] | None = None
    equalized: int = 0  # chains equalized
    init_scale: float | None = None  # mixed bit: the target used (auto_tune: found)
    residual_sum: ResidualSum | None = None  # SkipLayerNormalization fusion, measured
    auto_tune: list[tuple[float, float]] = field(default_factory=list)  # (init_scale, cosine)


@dataclass
class GateReport:
    """The accuracy gate: the written model against the float one on held-out samples."""

    samples: int
    comparisons: dict[str, OutputComparison]
    failures: list[str]  # empty: passed

    @property
    def mean_bias_percent(self) -> float:
        return model_mean_bias_percent(self.comparisons)


@dataclass(frozen=True)
class TargetAttempt:
    float_units: int  # how many of the most harmful units were kept float
    passed: bool
    mean_bias_percent: float
    min_cosine: float  # an integer output counts its agreement (OutputComparison.similarity)


@dataclass
class TargetReport:
    """How the accuracy target was met, or why not: what the quantized model missed, what
    was tried, the units left float and what that costs."""

    missed: list[str]
    attempts: list[TargetAttempt]
    float_units: list[str]  # empty: not met
    size_before: int = 0  # bytes of the fully quantized model
    size_after: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)  # float, quantized, written
    cpu: str = ""

    @property
    def met(self) -> bool:
        return bool(self.float_units)


@dataclass(frozen=True)
class SampleError:
    """The written model's output error against float's on the one sample it was timed on
    (evaluate.metrics.output_error: noise over the float outputs' power)."""

    error: float
    on: str  # "a calibration sample", "a seeded random input"

    def lines(self) -> list[str]:
        lines = [f"  output error against float on {self.on}: {self.error:.3g} of the float "
                 "outputs' power"]
        if self.error >= POOR_OUTPUT_ERROR:
            lines.append(f"  warning: above {POOR_OUTPUT_ERROR} (about 10 dB) on this one "
                         "sample: check the model on your data (--accuracyThreshold with "
                         "[evaluate_param] eval data); more bits keep more")
        return lines


@dataclass(frozen=True)
class InferredShape:
    """An input shape with a dimension read from the sample files' sizes."""

    what: str  # "calibration data", "eval data"
    name: str
    dtype: str
    shape: tuple[int, ...]  # the longest sample's
    file: Path  # the first sample's
    axis: int = 0  # the dimension read
    shortest: int | None = None  # the shortest length there (None: all alike)

    def line(self) -> str:
        dims = [str(d) for d in self.shape]
        if self.shortest is None or self.shortest == self.shape[self.axis]:
            source = f"from the size of {shown(self.file.name)}"
        else:
            dims[self.axis] = f"{self.shortest}..{self.shape[self.axis]}"
            source = "from each file's size"
        return f"  {self.what}: input {self.name!r} read as {self.dtype} [{','.join(dims)}] " \
               f"({source})"


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
    weights: list[WeightRecord] = field(default_factory=list)  # WeightQuant
    weight_quant: WeightQuantSummary | None = None
    post_training: PostTrainingSummary | None = None
    gate: GateReport | None = None
    target: TargetReport | None = None  # the gate failed and units were kept float
    data: SampleFormat | None = None  # how calibration (or eval) files became inputs
    dynamic: DynamicSummary | None = None  # DynamicQuant
    fp16: Float16Summary | None = None  # --fp16
    inferred_shapes: list[InferredShape] = field(default_factory=list)
    # Inputs whose calibration samples are all the same bytes, and how many there are.
    identical_samples: dict[str, int] = field(default_factory=dict)
    # Calibration samples whose largest magnitude is far above the others' (dataset.outlying).
    outlier_samples: list[OutlierSample] = field(default_factory=list)
    # Files this run replaced that it had not written before: an existing <output>.data.
    replaced: list[Path] = field(default_factory=list)
    kept_input: str = ""  # why the float model was written instead, when it was
    encodings_file: Path | None = None  # where the model's encodings were written
    # "float" and "quantized" timed against each other (WeightQuant adds "dequantized at
    # load", runtime.DEQUANTIZE_AT_LOAD); None: not measured, `latency_skipped` says why.
    latency: Latency | None = None
    latency_skipped: str = ""
    # WeightQuant and DynamicQuant: the output error on the sample timed (PostTraining
    # measures its own on held-out samples).
    sample_error: SampleError | None = None

    @property
    def gate_failures(self) -> list[str]:
        return self.gate.failures if self.gate is not None else []

    def to_dict(self) -> dict[str, Any]:
        """Every figure as JSON-ready data (plain_data.plain), with `passed` added."""
        return {**plain(self), "passed": self.passed}

    @property
    def passed(self) -> bool:
        return not self.gate_failures

    @property
    def slower_than_float(self) -> bool:
        """Whether the float model ran faster than the written one by the latency margin,
        beyond the noise (runtime.Latency.faster)."""
        return self.latency is not None and self.latency.faster("float", "quantized")

    @property
    def quantized(self) -> list[WeightRecord]:
        return [w for w in self.weights if w.quantized]

    @property
    def skipped(self) -> list[WeightRecord]:
        return [w for w in self.weights if not w.quantized]

    def format(self, max_skipped: int = 20) -> str:
        ratio = self.size_after / self.size_before if self.size_before else 0.0
        storages = sorted({w.storage for w in self.quantized})
        bits = f"{self.bit_num}-bit" if self.bit_num else "mixed bit"  # --bitNum=0
        lines = [f"{self.quant_type} {bits}: {shown(self.model_file)} -> "
                 f"{shown(self.output_file)}"]
        lines += [shape.line() for shape in self.inferred_shapes]
        lines += [f"  warning: calibration data: the {count} samples of input {name!r} are "
                  "all the same bytes: every range fits that one sample; give samples that "
                  "vary as the model's real inputs do"
                  for name, count in self.identical_samples.items()]
        lines += [f"  warning: calibration data: input {o.input!r}: {shown(o.path)} reaches "
                  f"{o.peak:.3g}, {o.peak / o.median:.0f}x the median sample's largest "
                  f"magnitude ({o.median:.3g}): a corrupted or unnormalized sample? Every "
                  "range it reaches spans it (MAX_MIN); leave it out if it is not meant to "
                  "be there" for o in self.outlier_samples]
        if self.quant_type == "WeightQuant":
            lines += [
                f"  weights quantized: {len(self.quantized)}"
                + (f" (stored as {', '.join(storages)})" if storages else ""),
                f"  weights skipped:   {len(self.skipped)}",
            ]
            if self.weight_quant is not None:
                lines += weight_quant_lines(self.weight_quant, self.quantized)
        if self.dynamic is not None:
            d = self.dynamic
            levels = 63 if d.reduce_range else 127
            given = ("" if d.reduce_range == d.target.saturates
                     else f"; reduce_range={str(d.reduce_range).lower()} set in the config")
            lines += [
                f"  target: {d.target.describe()}{given}",
                f"  {d.strategy}: MatMul/Gemm weights int8 per output column, levels "
                f"[-{levels}, {levels}]; activations quantized at run time, per tensor "
                "(onnxruntime DynamicQuantizeMatMul)",
                f"  weights quantized: {len(self.quantized)}",
                f"  weights kept float: {len(self.skipped)}",
            ]
            for kind, count in d.float_weights.items():
                lines.append(f"  {kind} weights kept float: {count} ({DYNAMIC_FLOAT_WHY[kind]})")
            if d.residual_sum is not None:
                lines.append(residual_sum_line(d.residual_sum))
        if self.data is not None:
            lines.append(f"  data: {self.data.describe()}")
        if self.post_training is not None:
            lines += post_training_lines(self.post_training)
        if self.target is not None:
            lines += target_lines(self.target)
        if self.gate is not None:
            lines += gate_lines(self.gate)
        for w in self.skipped[:max_skipped]:
            lines.append(f"    {w.name} [{w.op_type} {'x'.join(map(str, w.shape))}]: {w.reason}")
        if len(self.skipped) > max_skipped:
            lines.append(f"    ... and {len(self.skipped) - max_skipped} more")
        # Asked for, the line says what it did; for a float16 model, only what it changed.
        if self.fp16 is not None and not (self.fp16.from_model and not self.fp16.converted
                                          and not self.fp16.kept):
            f = self.fp16
            kept = (f"; {f.kept} kept float32 (beyond float16's range)" if f.kept else "")
            why = (", as the model stores its own (--fp16=off: float32)" if f.from_model
                   else "")
            lines.append(f"  fp16: {f.converted} float32 constants stored in float16 "
                         f"({_mb(f.float32_bytes)} -> {_mb(f.float32_bytes // 2)}){kept}{why}")
        if self.kept_input:
            lines.append(f"  written float: {self.kept_input}")
        if self.encodings_file is not None:
            lines.append(f"  encodings: {self.encodings_file}")
        if self.opset_after != self.opset_before:
            lines.append(f"  opset: {self.opset_before} -> {self.opset_after}")
        if self.post_training is not None and self.post_training.latency_check is not None:
            lines.append(latency_check_line(self.post_training.latency_check,
                                            self.post_training.target.name))
        if self.post_training is not None and self.post_training.plan_check is not None:
            lines.append(plan_check_line(self.post_training.plan_check))
        if self.post_training is not None and self.post_training.dynamic_check is not None:
            lines.append(self.post_training.dynamic_check.line())
        if self.latency is not None:
            lines.append(latency_line(self.latency))
            lines += at_load_lines(self.latency)
            lines += self.sample_error.lines() if self.sample_error is not None else []
            if self.post_training is not None and self.slower_than_float:
                lines.append(slower_line(self.latency, ratio))
        elif self.latency_skipped:
            lines.append(f"  latency: not measured ({self.latency_skipped})")
        lines.append(
            f"  size: {_mb(self.size_before, self.size_after)} -> "
            f"{_mb(self.size_after, self.size_before)} ({ratio:.3f} of float)"
        )
        lines.append(f"  time: {self.seconds:.2f} s")
        return "\n".join(lines)


def weight_quant_lines(s: WeightQuantSummary, quantized: list[WeightRecord],
                       shown: int = 10) -> list[str]:
    layouts = Counter(w.layout for w in quantized)
    lines = []
    if layouts and set(layouts) != {"per channel"}:
        lines.append("  layout: " + ", ".join(f"{n} {k}" for k, n in sorted(layouts.items())))
    if s.low_bit_recipe and any(w.layout.startswith("blocks") or w.op_type == "Gather"
                                for w in quantized):
        lines.append(f"  low bits: MatMul/Gemm weights, and Conv weights of {s.block_size} input "
                     f"channels or more, in blocks of {s.block_size} along their inputs; "
                     "depthwise convs and Gather tables in 8 bits (ptqconv's default at 1-4 "
                     "bits; block_size=0 in [weight_quant_param] gives every weight the bits "
                     "asked, per channel)")
    elif s.depthwise_8bit:
        lines.append(f"  depthwise convs in 8 bits: {s.depthwise_8bit} (one input channel per "
                     "group, no block to form; block_size=0 keeps them at the bits asked)")
    if s.shallow_errors is not None or s.shallow_8bit or s.shallow_unmeasured:
        measured = f"; not measured: {s.shallow_unmeasured}" if s.shallow_unmeasured else ""
        if s.shallow_errors is not None:
            low, high = s.shallow_errors
            measured = (f"; output noise-to-signal on the calibration samples {low:.3g} at "
                        f"the bits asked, {high:.3g} at 8")
        why = ("8 bits only where they win with any one sample left out; shallow_convs_8bit "
               "in [weight_quant_param] sets it" if measured else
               "shallow_convs_8bit=true in [weight_quant_param]")
        lines.append(f"  shallow convs (at most {SHALLOW_DEPTH} weights per output channel: "
                     f"image stems, convs over few channels) in 8 bits: "
                     f"{s.shallow_8bit or 'none'}{measured} ({why})")
    if s.folded_for_speed is not None:
        count, ratio = s.folded_for_speed
        tables = (f" and {_count(s.tables_folded, 'embedding table')} dequantized whole "
                  "before the Gather" if s.tables_folded else "")
        lines.append(f"  weights dequantized at load: {count} DequantizeLinear written as "
                     f"Cast -> Mul{tables}, which onnxruntime folds into float weights when "
                     f"it loads the model (with DequantizeLinear it ran at {ratio:.2f}x float; the "
                     "file keeps the integers, memory holds float weights)")
    if s.activations_unfused:
        lines.append(f"  Relu/Clip behind MatMulNBits-ready Gemm weights written as Max/Min: "
                     f"{s.activations_unfused} (so that onnxruntime fuses those weights into "
                     "MatMulNBits instead of dequantizing them on every inference)")
    if s.equalize_chains:
        if s.equalize_errors is None:
            lines.append(f"  equalization left alone: {s.equalize_chains} Conv -> Relu -> Conv "
                         "chains (no calibration data to measure it on)")
        else:
            without, with_ = s.equalize_errors
            lines.append(f"  equalization of {s.equalize_chains} Conv -> Relu -> Conv chains: "
                         f"{'kept' if s.equalized else 'left out'} (1 - output cosine on the "
                         f"calibration samples: {without:.3g} without, {with_:.3g} with)")
    lines += gptq_lines(s.gptq)
    if s.bias_correction:
        lines.append(f"  weight correction (MindSpore var/mean, in scales and zero points): "
                     f"{s.weight_corrections} weights")
    if s.bias_corrections is not None:
        applied = [c for c in s.bias_corrections if c.applied]
        lines.append(f"  bias correction (expected output shift): {len(applied)} of "
                     f"{len(s.bias_corrections)} Conv/Gemm layers")
        lines += [f"    {c.node_name}: skipped, {c.reason}"
                  for c in s.bias_corrections if not c.applied][:shown]
    if s.init_scale is not None:
        tuned = (f", found by auto_tune ({len(s.auto_tune)} tried, output cosine "
                 f"{dict(s.auto_tune).get(s.init_scale, float('nan')):.4f})"
                 if s.auto_tune else "")
        elements = sum(math.prod(w.shape) for w in quantized)
        average = (sum(w.bits * math.prod(w.shape) for w in quantized) / elements
                   if elements else 0.0)
        lines.append(f"  mixed bit: init_scale {s.init_scale:.4g}{tuned}; {average:.2f} bits "
                     "per weight on average; bits per layer:")
        lines += [f"    {w.name} [{w.op_type} {'x'.join(map(str, w.shape))}]: {w.bits} bits "
                  f"({w.storage})" for w in quantized]
    if s.residual_sum is not None:
        lines.append(residual_sum_line(s.residual_sum))
    return lines


def gptq_lines(g: GPTQSummary | None, suffix: str = "") -> list[str]:
    """The GPTQ line, none where GPTQ rounded no layer (a float plan)."""
    return [gptq_line(g) + suffix] if g is not None and g.layers else []


def gptq_line(g: GPTQSummary) -> str:
    ratio = "" if g.error_ratio is None else f", layer error {g.error_ratio:.3f} of nearest's"
    passes = f" in {g.passes} passes" if g.passes > 1 else ""
    default = (" (ptqconv's default with calibration data at this width; quant_strategy="
               "MAX_MIN rounds to nearest)" if g.by_default else "")
    measured = ("" if g.errors is None else
                f"; held-out output error {g.errors[0]:.3g} against nearest weights' "
                f"{g.errors[1]:.3g}")
    if not g.kept:
        return (f"  GPTQ left out{measured}: nearest weights written{default}")
    return (f"  GPTQ: {g.layers} layers{passes}{ratio}; {g.rows_nearest} rows kept "
            f"round-to-nearest (no better){measured}{default}")


def post_training_lines(s: PostTrainingSummary, shown: int = 10) -> list[str]:
    # Migrations only prepare units for quantization: with none quantized, the model
    # written is the float one, without them.
    by_technique = {m.technique: m for m in s.migrations} if s.units or s.bodies else {}
    equalized = by_technique.get("equalization")
    smoothed = by_technique.get("SmoothQuant")
    grid = s.weight_grid
    given = ("" if s.reduce_range == s.target.saturates
             else f"; reduce_range={str(s.reduce_range).lower()} set in the config")
    host = ([f"  note: the errors below are measured on this CPU, whose U8S8 kernels saturate "
             f"the 8-bit weights {s.target.name}'s do not: they overstate the error there"]
            if s.host_saturates and not s.target.saturates and not s.reduce_range
            and s.bit_num >= 8 and (s.measured or s.units) else [])
    lines = [
        f"  target: {s.target.describe(s.bit_num)}{given}",
        *host,
        (f"  calibration: {s.method} on {_count(s.samples, 'sample')}" if s.units or s.bodies
         else f"  calibration: {s.method} on {_count(s.samples, 'sample')} (for the "
         "all-integer candidates; the float plan written uses no range)" if s.measured else
         f"  calibration: {_count(s.samples, 'sample')} (tensor shapes for the latency plan; "
         "no range used)")
        + (f" (histograms of {_count(s.histogram_sampled, 'tensor')} from at most "
           f"{s.histogram_values:,} of their values a sample; histogram_sampling=false bins "
           f"all)" if s.histogram_sampled else ""),
        *(_import_lines(s.imported, s.method, s.bit_num) if s.imported else []),
        *_measured_lines(s),
        *([f"  KL thresholds refused: {s.kl_refused} (clipping would leave below "
           f"{KL_SQNR_FLOOR_DB:g} dB SQNR; observed range used)"] if s.kl_refused else []),
        *([f"  activations: {s.activation_bits}-bit"
           + (" (activation_bit_num follows bit_num; activation_bit_num=8 keeps 8-bit ones)"
              if s.activation_bits == s.bit_num else "")]
          if s.activation_bits != s.bit_num or s.activation_bits < 8 else []),
        f"  node units quantized: {s.units}",
        *([f"  kept float by skip_quant_node: {_count(len(s.skipped), 'node')} "
           f"({', '.join(s.skipped[:5])}"
           f"{', ...' if len(s.skipped) > 5 else ''})"] if s.skipped else []),
        *([f"  LSTM/GRU/RNN weights kept float: {s.recurrent_float} (onnxruntime has no "
           "static int8 recurrent kernel; DynamicQuant runs LSTMs in int8, WeightQuant stores "
           "them in fewer bits)"] if s.recurrent_float else []),
        *kept_float_lines(s.latency_plan),
        *([f"  {_nothing(s)}: onnxruntime runs the units above fastest in float on this "
           "CPU (the cost model's prediction); [full_quant_param] latency_aware=false "
           "quantizes them anyway"]
          if not s.units and s.latency_plan and s.latency_plan.kept_float
          and not s.bodies else []),
        *([f"  equalized: {len(equalized.migrated)} Conv -> Conv activations"]
          if equalized and equalized.migrated else []),
        *([f"  SmoothQuant: {len(smoothed.migrated)} MatMul inputs"
           + (f" ({s.smoothing_undone} undone: no MatMul reading them is quantized)"
              if s.smoothing_undone else "")]
          if smoothed and smoothed.migrated else []),
        *[line for m in by_technique.values() for line in _left_alone(m)],
        *([f"  kept float (mask-like range beyond {SENTINEL_RANGE:g}): "
           f"{', '.join(s.sentinels)}"] if s.sentinels else []),
        f"  activations quantized: {s.activation_ranges} ranges, "
        f"{s.quantize_nodes} QuantizeLinear nodes",
        *([f"  integer activations: {_integer_forms(s.integer_activations)}"]
          if s.integer_activations else []),
        *([f"  float hard-swish after a quantized tensor written as HardSwish (one "
           f"DequantizeLinear read): {s.float_hard_swish}"]
          if s.float_hard_swish else []),
    ]
    if grid is not None:
        levels = ("binary levels {-1, +1}" if grid.binary
                  else f"levels [{grid.qmin}, {grid.qmax}]")
        own = (f"int8 symmetric{' per-channel' if s.per_channel else ''}, {levels}"
               f"{', reduce_range' if grid.qmax < 2 ** (s.bit_num - 1) - 1 else ''}")
        # Imported weights keep the file's grids, whatever bit_num says.
        imported = s.imported.weights if s.imported else 0
        if imported:
            own = ("on the encodings file's grids" if imported >= s.weights_quantized
                   else f"{imported} on the encodings file's grids, the others {own}")
        lines.append(f"  weights quantized: {s.weights_quantized} ({own})")
        if s.shallow_8bit:
            lines.append(f"  shallow convs in 8 bits: {s.shallow_8bit} (at most {SHALLOW_DEPTH} "
                         "weights per output channel: depthwise convs, image stems, convs over "
                         f"few channels; shallow_convs_8bit=false gives them {s.bit_num})")
        if s.bias_widened:
            lines.append(f"  weight scales raised so that the int32 bias holds: "
                         f"{s.bias_widened} (their inputs' calibration range is (nearly) "
                         f"constant, so input scale x weight scale was too fine)")
    if s.embedding_tables:
        before = sum(r.float_bytes for r in s.embedding_tables)
        after = sum(math.prod(r.shape) + 4 * r.shape[0] for r in s.embedding_tables)
        lines.append(f"  embedding tables: {len(s.embedding_tables)} in int8 per row "
                     f"({_mb(before)} -> {_mb(after)}; embedding_quant=false keeps them float)")
    if s.residual_sum is not None:
        lines.append(residual_sum_line(s.residual_sum))
    lines += gptq_lines(s.gptq, " (before the accuracy target's repair)" if s.repaired else "")
    lines += _body_lines(s, shown)
    if s.bias_corrections is not None:
        applied = [c for c in s.bias_corrections if c.applied]
        lines.append(f"  bias correction: {len(applied)} of {len(s.bias_corrections)} layers")
        lines += [f"    {c.node_name}: skipped, {c.reason}"
                  for c in s.bias_corrections if not c.applied][:shown]
    if s.layer_report is not None:
        lines += layer_report_lines(s.layer_report)
    if s.sensitivity is not None:
        lines += sensitivity_lines(s.sensitivity, shown)
    return lines


def _import_lines(i: ImportSummary, method: str, bits: int = 8) -> list[str]:
    grids = [f"{i.activations} activations", f"{i.weights} weights"]
    # The file's grids carry their own widths: bit_num only makes the others.
    widths = (f" (their widths, not bit_num {bits})" if bits != 8 else "")
    lines = [f"  encodings imported from {i.path} ({i.version}): {' and '.join(grids)} on the "
             f"file's grids{widths}; {i.calibrated} activations calibrated ({method}), "
             f"{i.computed} weights from their values"]
    if i.regridded:
        lines.append(f"    {i.regridded} activations keep the file's range on {8}-bit grids "
                     "(wider than uint8 in the file)")
    if i.float_tensors or i.float_ops:
        lines.append(f"    kept float by float encodings: {i.float_tensors} tensors, "
                     f"{i.float_ops} weight ops")
    if i.saturating:
        lines.append(f"    {i.saturating} imported weight grids are wider than 7 bits: "
                     "onnxruntime's U8S8 kernels may saturate on this CPU (no VNNI)")
    if i.derived:
        reasons = Counter(i.derived.values())
        listed = "; ".join(f"{why}: {count}" for why, count in reasons.most_common(4))
        lines.append(f"    made here as usual: {len(i.derived)} entries ({listed})")
    if i.unused:
        reasons = Counter(i.unused.values())
        listed = "; ".join(f"{why}: {count}" for why, count in reasons.most_common(4))
        names = ", ".join(list(i.unused)[:5]) + (" ..." if len(i.unused) > 5 else "")
        lines.append(f"    not used: {len(i.unused)} entries ({listed}): {names}")
    if i.choices:
        lines.append(f"  chosen by the encodings file (ptqconv wrote it): {i.choices}")
    return lines


def _body_lines(s: PostTrainingSummary, shown: int) -> list[str]:
    lines = []
    for b in s.bodies:
        if b.units:
            kernels = ", ".join(f"{op} {count}" for op, count in b.integer_kernels.items())
            lines.append(f"  {b.body}: {b.units} units, {b.weight_ops} weight ops quantized"
                         f" (onnxruntime: {kernels or 'no integer kernel'})")
        else:
            lines.append(f"  {b.body}: stays float ({b.reason})")
        by_reason: dict[str, list[str]] = {}
        for op, why in b.kept_float.items():
            by_reason.setdefault(why, []).append(op)
        for why, ops in by_reason.items():
            listed = ", ".join(ops[:3]) + (f" and {len(ops) - 3} more" if len(ops) > 3 else "")
            lines.append(f"    {len(ops)} weight op{'s' if len(ops) > 1 else ''} float "
                         f"({listed}): {why}")
    if s.unobserved:
        listed = ", ".join(s.unobserved[:shown]) + (" ..." if len(s.unobserved) > shown else "")
        lines.append(f"  kept float (never ran during calibration): {listed}")
    if s.min_max_only and s.method != "MAX_MIN":
        lines.append(f"  ranges of {s.min_max_only} tensors of If bodies inside loops: min/max "
                     f"(calibration sees one [min, max] per execution there, not the values)")
    return lines


# Why DynamicQuant leaves these weights float, by dynamic_quant.FLOAT_KINDS label.
DYNAMIC_FLOAT_WHY = {
    "Conv": "onnxruntime's dynamic ConvInteger runs slower than its float Conv; PostTraining "
            "runs them as QLinearConv, WeightQuant stores them in fewer bits",
    "GRU/RNN": "onnxruntime has no dynamic int8 GRU or RNN; WeightQuant stores them in fewer "
               "bits"}

# An output error (noise over signal power) from which a warning says the model is not
# usable as it is: 10 dB, an output cosine of about 0.95.
POOR_OUTPUT_ERROR = 0.1


def _nothing(s: PostTrainingSummary) -> str:
    """What a model with no integer unit still got quantized."""
    return ("no node unit quantized (embedding tables only)" if s.embedding_tables
            else "nothing quantized")


def _measured_lines(s: PostTrainingSummary) -> list[str]:
    if not s.measured:
        if s.open_choices and not (s.imported and s.imported.choices) and s.units:
            return [f"  chosen without measuring (too few samples to hold any out): "
                    f"{s.chosen_shown or s.chosen}"]
        return []
    how = (f"{s.scored_folds} folds, each scored with ranges from the others"
           if s.scored_folds > 1 else "ranges from the other samples")
    among = "" if s.units or s.bodies else " among all-integer candidates"
    before = " (before the accuracy target's repair, below)" if s.repaired else ""
    lines = [f"  chosen by measurement{among}: {s.chosen_shown or s.chosen} (output error "
             f"against float on {s.held_out} held-out samples; {how}){before}:"]
    most = max(m.folds for m in s.measured)
    least = min((m.error for m in s.measured if m.folds == most), default=0.0)
    # The header's name leaves out what a choice turned off, which a candidate's
    # difference from the start names: the chosen line is marked.
    # Chosen over a lower error: within the margin, or (beyond it) a win that one held-out
    # sample carried (evaluate.held_out.beats).
    tied = f" <- chosen (within {s.tie:g} of the lowest: a tie, the simpler wins)"
    carried = (" <- chosen (the lower errors rest on one held-out sample: a tie, the simpler "
               "wins)")
    lines += [f"    {m.what}: {m.error:.3g}"
              + ((tied if least < m.error <= least + s.tie
                  else carried if m.error > least + s.tie else " <- chosen")
                 if m.choice == s.chosen else "")
              # Its error over fewer folds than the others': not comparable with theirs.
              + (f" (dropped after {m.folds} of {most} folds, on which the kept ones scored "
                 "lower)" if m.folds < most else "")
              for m in s.measured]
    chosen = next((m.error for m in s.measured if m.choice == s.chosen), None)
    which = "chosen"
    if s.gptq is not None and s.gptq.errors is not None and s.gptq.kept:
        # Scored with nearest weights; GPTQ's were written, with their own figure.
        chosen, which = s.gptq.errors[0], "written"
    if chosen is not None and chosen >= POOR_OUTPUT_ERROR and not s.repaired:
        hint = (f"{s.activation_bits}-bit activations cost most: activation_bit_num=8 keeps "
                "8-bit ones" if s.activation_bits < 8 else
                "--accuracyThreshold checks it, and keeps its most harmful units float")
        lines.append(f"  warning: the {which} model's output error is {chosen:.3g} of the "
                     f"float outputs' power (above {POOR_OUTPUT_ERROR}, about 10 dB): {hint}")
    return lines


INTEGER_FORMS = {"HardSigmoid": "QLinearAdd", "Tanh": "QLinearSigmoid"}


def _integer_forms(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {op} as {INTEGER_FORMS.get(op, 'integer ops')}"
                     for op, count in sorted(counts.items()))


def kept_float_lines(plan: LatencyPlan | None, shown: int = 3) -> list[str]:
    """The units kept float because onnxruntime runs them faster in float."""
    if plan is None or not plan.kept_float:
        return []
    kept = plan.kept_float
    names = ", ".join(f"{c.name} ({c.op_type})" for c in kept[:shown])
    more = f" and {len(kept) - shown} more" if len(kept) > shown else ""
    lines = [f"  kept float for speed: {len(kept)} unit{'s' if len(kept) > 1 else ''}, "
             f"{names}{more} (predicted {plan.planned_us / 1e3:.2f} ms as planned, "
             f"{plan.quantized_us / 1e3:.2f} ms all integer, {plan.float_us / 1e3:.2f} ms all "
             "float)"]
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def latency_check_line(check: LatencyCheck, target: str) -> str:
    first = check.integer.ms
    line = (f"  latency check (the cost model is for x86_avx2, the target is {target}): "
            f"all-integer {first['quantized'] / first['float']:.2f}x float")
    if check.planned is None:
        return line + ": kept" + ("" if first["quantized"] <= first["float"]
                                  else " (the cost model keeps no unit float)")
    ms = check.planned.ms
    units = (f"cut to its first {_count(check.planned_float_units, 'unit')} of "
             f"{check.cut_from} float, the fastest of {check.plans_timed} plans timed"
             if check.cut_from else f"{check.planned_float_units} units float")
    plan = (f"the cost model's plan ({units}) "
            f"{ms['planned'] / ms['float']:.2f}x, all-integer {ms['quantized'] / ms['float']:.2f}x")
    kept = "kept the plan" if check.kept_plan else "kept all-integer"
    if check.errors is not None:
        planned, integer = distinct(*check.errors)
        errors = f"held-out error {planned} against all-integer's {integer}"
        kept += (f" (no slower beyond the noise, more accurate: {errors})" if check.tied
                 else f" (as accurate: {errors})" if check.kept_plan
                 else f" (the plan faster, less accurate: {errors})")
    elif not check.kept_plan and ms["planned"] < ms["quantized"] and check.why_kept:
        kept += f" (the plan: {check.why_kept})"
    return (f"{line}; {plan} ({check.planned.runs} interleaved runs, "
            f"{check.planned.cpu}): {kept}")


def plan_check_line(check: PlanCheck) -> str:
    ms = check.timed.ms
    kept = ("kept all-integer" if check.kept_integer else "kept the plan")
    if check.plan_float:
        kept += (" (the model asked for: not slower than the float plan)" if check.kept_integer
                 else f" (all-integer {check.why_kept})")
    elif check.errors is not None:
        integer, planned = distinct(check.errors[1], check.errors[0])
        errors = f"held-out error {integer} against the plan's {planned}"
        tie = "; the plan's lower error rests on one held-out sample" if check.one_sample else ""
        kept += (f" (as accurate: {errors}{tie})" if check.kept_integer
                 else f" (all-integer faster, less accurate: {errors})")
    elif not check.kept_integer and ms["integer"] < ms["planned"] and check.why_kept:
        kept += f" (all-integer: {check.why_kept})"
    return (f"  latency check (the cost model's plan keeps {check.planned_float_units} "
            f"unit{'s' if check.planned_float_units != 1 else ''} float): planned "
            f"{ms['planned'] / ms['float']:.2f}x float, all-integer "
            f"{ms['integer'] / ms['float']:.2f}x ({check.timed.runs} interleaved runs, "
            f"{check.timed.cpu}): {kept}")


def slower_line(latency: Latency, size_ratio: float) -> str:
    ms = latency.ms
    return (f"  warning: the written model runs slower than float on this CPU "
            f"({ms['quantized'] / ms['float']:.2f}x, beyond the noise): its integer kernels "
            f"do not pay for the quantize, dequantize and layout changes around them here; at "
            f"{size_ratio:.3f} of float's size, the float model is faster")


def latency_line(latency: Latency) -> str:
    quantized, reference = latency.ms["quantized"], latency.ms["float"]
    # A slower median the rounds do not bear out is noise, not a finding (sub-millisecond
    # models on a busy machine: 1.64x one run, 1.02x the next).
    noise = (", slower on the medians only: within the noise"
             if quantized > reference and latency.rounds
             and not latency.faster("float", "quantized", 1.0) else "")
    return (f"  latency: {quantized:.3f} ms, float {reference:.3f} ms "
            f"({quantized / reference:.2f}x; median of {latency.runs} interleaved runs, "
            f"{latency.threads} thread{'s' if latency.threads > 1 else ''}, {latency.cpu}"
            f"{noise})")


def at_load_lines(latency: Latency) -> list[str]:
    """Where weight-only DequantizeLinear made the model slower than float and onnxruntime's
    dequantization at load runs it faster, the session option that does it."""
    ms = latency.ms
    at_load = ms.get(AT_LOAD)
    if at_load is None or not latency.faster("float", "quantized") \
            or not latency.faster(AT_LOAD, "quantized"):
        return []
    option = ", ".join(f"{k}={v}" for k, v in DEQUANTIZE_AT_LOAD.items())
    return [f"  onnxruntime runs the weights' DequantizeLinear on every inference; with the "
            f"session option {option} it dequantizes them once at load: {at_load:.3f} ms "
            f"({at_load / ms['float']:.2f}x float), holding float weights in memory"]


def _left_alone(m: Migration, shown: int = 3) -> list[str]:
    """One line for the candidates a migration left alone for a reason other than its own
    measurement, the commonest reasons first."""
    reasons = Counter(reason for reason in m.left_alone.values()
                      if reason != "predicted to gain nothing")
    if not reasons:
        return []
    listed = "; ".join(f"{reason}: {count}" for reason, count in reasons.most_common(shown))
    more = f"; {len(reasons) - shown} other reasons" if len(reasons) > shown else ""
    count = sum(reasons.values())
    return [f"  {m.technique} left alone: {count} candidate{'s' if count > 1 else ''} "
            f"({listed}{more})"]


def target_lines(t: TargetReport) -> list[str]:
    lines = [f"  accuracy target: the quantized model missed it ({'; '.join(t.missed)})"]
    tried = ", ".join(f"{a.float_units} float: {'pass' if a.passed else 'fail'} "
                      f"(mean bias {a.mean_bias_percent:.3g}%, min cosine {a.min_cosine:.6f})"
                      for a in t.attempts)
    if not t.attempts:
        # Units inside If / Loop / Scan bodies are not ranked: nothing to keep float.
        lines.append("    not met: the repair keeps main-graph units float, and this model "
                     "quantizes units only inside If / Loop / Scan bodies; the quantized model "
                     "was written (skip_quant_node keeps body nodes float)")
        return lines
    lines.append(f"    tried, most harmful units first: {tried}")
    if not t.met:
        lines.append("    not met even with every unit float: the quantized model was written")
        return lines
    shown = ", ".join(t.float_units[:10]) + (f" and {len(t.float_units) - 10} more"
                                               if len(t.float_units) > 10 else "")
    lines.append(f"    met with {len(t.float_units)} unit{'s' if len(t.float_units) > 1 else ''}"
                 f" float: {shown}")
    timed = (("; latency " + ", ".join(f"{k} {v:.3g} ms" for k, v in t.latency_ms.items())
              + f" ({t.cpu})") if t.latency_ms else " (measure_latency=false: not timed)")
    lines.append(f"    cost: size {_mb(t.size_before)} -> {_mb(t.size_after)}{timed}")
    return lines


def gate_lines(gate: GateReport) -> list[str]:
    lines = [f"  accuracy gate on {gate.samples} eval samples "
             f"(mean bias {gate.mean_bias_percent:.3f}%):"]
    for name, comparison in gate.comparisons.items():
        r = comparison.result()
        top1 = "" if r["top1_agreement"] is None else f", top-1 {r['top1_agreement']:.3f}"
        changed = (f"; shape differs from float's on {r['shape_changes']} of {r['samples']} "
                   "samples (compared as unrelated values)" if r["shape_changes"] else "")
        similar = (f"cosine {r['cosine']:.5f}, SQNR {r['sqnr_db']:.1f} dB"
                   if r["agreement"] is None else
                   f"integer values, {r['agreement']:.4f} equal to float's")
        lines.append(f"    {name}: mean bias {r['mean_bias_percent']:.3f}%, "
                     f"{similar}{top1}{changed}")
    return lines


def layer_report_lines(report: LayerReport) -> list[str]:
    head = (f"  per-layer report: {report.path} ({report.tensors} "
            f"tensor{'' if report.tensors == 1 else 's'})")
    if not report.worst:  # nothing quantized in the main graph: no heading over nothing
        return [head]
    lines = [f"{head}; worst by per-channel SQNR:"]
    for r in report.worst:
        lines.append(f"    {r['tensor_name']} ({r['kind']}, {r['node_name']}): channel SQNR "
                     f"{r['channel_sqnr_db']:.1f} dB, rmse/scale {r['rmse_over_scale']:.2f}, "
                     f"clip {r['clip_rate']:.2%}, cumulative cos {r['cos_similarity']:.4f}")
    if report.suggested_skip:
        lines.append(f"    suggested skip_quant_node={','.join(report.suggested_skip)}")
    return lines


def sensitivity_lines(ranking: list[UnitSensitivity], top: int = 10) -> list[str]:
    lines = [f"  sensitivity ({len(ranking)} units, output SQNR with only that unit quantized; "
             "lowest first):"]
    lines += [f"    {r.node} ({r.op_type}): {r.output_sqnr_db:.1f} dB" for r in ranking[:top]]
    if ranking:
        lines.append(f"    to keep the worst in float: --skipQuantNode={ranking[0].node}")
    return lines


def residual_sum_line(r: ResidualSum) -> str:
    return (f"  residual Adds before LayerNormalization: {r.adds} "
            f"{'written as Sum' if r.applied else 'kept'} (onnxruntime's SkipLayerNormalization "
            f"fusion {r.fused_ms:.3f} ms, unfused {r.unfused_ms:.3f} ms at "
            f"[{r.shape[0]}, {r.shape[1]}] on {r.cpu})")


def distinct(a: float, b: float) -> tuple[str, str]:
    """`a` and `b` to 3 significant digits, or as many more (up to 6) as tell them apart."""
    for digits in range(3, 7):
        shown = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if shown[0] != shown[1]:
            return shown
    return f"{a:.3g}", f"{b:.3g}"


def _mb(n: int, unit_of: int | None = None) -> str:
    """`n` bytes in MB, or in kB below 100 kB; `unit_of`: in the unit `_mb(unit_of)` takes,
    so that the two sides of an arrow read alike (99.5 kB -> 100.2 kB, not -> 0.10 MB)."""
    if max(n, unit_of or 0) < 1e5:
        return f"{n / 1e3:.1f} kB"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e6:.3f} MB"
