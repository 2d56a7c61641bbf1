"""onnxruntime sessions, one way for every caller: options, loading with one-line errors,
probing intermediate tensors, and streaming samples with inference one sample ahead."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ptqconv.errors import PtqError, PtqUsageError, one_line
from ptqconv.files import is_utf8, temporary_directory
from ptqconv.graph.naming import values_by_name
from ptqconv.target import cpu_name, usable_cpus

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# The graphs ptqconv runs for itself were already simplified by onnxruntime (modelio), and
# re-applying this fusion to them fails (docs/decisions.md, MatMulAddFusion).
REAPPLIED_FUSIONS = ["MatMulAddFusion"]
# Above this many bytes of weights an in-memory model reaches onnxruntime as a temporary file
# with external data, which it maps, rather than as serialized bytes, which it parses into a
# copy of its own while the bytes are alive: BERT-base's calibration session peaked at
# 1.39 GB from bytes and 0.78 GB from a file (docs/decisions.md, sessions from files).
# Below it, bytes spare the disk. Protobuf's 2 GiB limit is far above it.
IN_MEMORY_BYTES = 64_000_000

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | ir.Model

# How long an idle intra-op thread spins before it sleeps (docs/decisions.md, bounded spinning).
SPIN_US = 200


# onnxruntime logs its errors (in colour) before raising them: ptqconv reports each as one
# line of its own, so only fatal ones are left to its log.
ORT_LOG_LEVEL = 4


def session_options(threads: int, level: str = "all",
                    prepack: bool = True) -> ort.SessionOptions:
    """`prepack=False` for a session that is only loaded (or only writes its graph), never
    run: packing the weights for the GEMM kernels would copy them all."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = ORT_LOG_LEVEL
    bound_spinning(options)
    options.graph_optimization_level = LEVELS[level]
    if not prepack:
        skip_prepacking(options)
    return options


def bound_spinning(options: ort.SessionOptions) -> None:
    """Idle intra-op threads spin SPIN_US, then sleep: long enough to catch the next op
    without a wake-up, short enough to leave the cores to Python-side work (observers)
    overlapping the next inference, or to another session being timed (docs/decisions.md,
    bounded spinning; latency timings)."""
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))


def skip_prepacking(options: ort.SessionOptions) -> None:
    options.add_session_config_entry("session.disable_prepacking", "1")


def release_memory() -> None:
    """Free what a finished step left and give it back to the system. onnx-ir's models are
    reference cycles (nodes and graphs point at each other), which only the cyclic garbage
    collector frees, and glibc keeps freed heap pages for reuse: without both, a conversion's
    later steps run on top of its earlier ones (BERT-base: a deleted 0.33 GB model stayed
    resident through onnxruntime's simplification; docs/decisions.md)."""
    gc.collect()
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


# Allocations of at least this many bytes get pages of their own, given back when freed.
# glibc's threshold otherwise grows with the largest block freed (up to 32 MB), after which
# such buffers come from the heap, which keeps what it held. 16 MB: BERT-base conversion
# peak 682 -> 662 MB at the same time; 4 or 8 MB gave 564 MB but cost ~15% more time in
# page faults on its 9.4 MB weights (docs/decisions.md, mmap threshold).
MMAP_THRESHOLD = 16 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def give_back_big_allocations() -> None:
    """Process-wide (glibc): allocations of MMAP_THRESHOLD bytes or more are mapped and
    unmapped, so a finished step's big buffers leave the resident set. The command line
    calls it; a Python caller may."""
    if (libc := _glibc()) is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _glibc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, safe for a one-line error."""
    text = str(exc).strip()
    return one_line(text.splitlines()[0]) if text else type(exc).__name__


def initializer_bytes(model: ir.Model) -> int:
    """Bytes the model's initializers take when serialized."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


@contextlib.contextmanager
def _loadable(source: ModelSource) -> Iterator[str | bytes]:
    """`source` as what onnxruntime loads: a path, or serialized bytes for an in-memory model
    with at most IN_MEMORY_BYTES of weights (a bigger one goes to a temporary file with
    external data, and so does one that still reads weights from its files: bytes would
    name them relative to the current directory)."""
    if isinstance(source, onnx.ModelProto):
        yield source.SerializeToString()
    elif isinstance(source, ir.Model):
        if initializer_bytes(source) <= IN_MEMORY_BYTES and not _reads_files(source):
            yield ir.to_proto(source).SerializeToString()
            return
        with temporary_directory() as tmp:
            path = tmp / "model.onnx"
            try:
                ir.save(source, path, external_data="model.onnx.data")
            except OSError as exc:
                raise PtqError(f"cannot write a copy of the model to {tmp} (TMPDIR): "
                               f"{exc.strerror or exc}") from None
            yield str(path)
    elif isinstance(source, bytes):
        yield source
    else:
        yield path_source(Path(source))


def _reads_files(model: ir.Model) -> bool:
    """Whether some initializer of `model` is still data in a file (not read into memory)."""
    return any(isinstance(v.const_value, ir.ExternalTensor)
               for graph in model.graphs() for v in graph.initializers.values())


def path_source(path: Path) -> str | bytes:
    """What onnxruntime loads for the model file `path`: the path, or the file's bytes when
    the path is not UTF-8 (external data is then looked up relative to the current
    directory, so such a model must keep its weights inside)."""
    return str(path) if is_utf8(path) else path.read_bytes()


class ModelRefused(PtqError):
    """onnxruntime refused to load the model named `label` (as opposed to failing to run it
    or to write its output)."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(f"{label}: onnxruntime cannot load the model: {reason}")
        self.label, self.reason = label, reason


class Session:
    """One onnxruntime CPU session whose failures are one-line PtqErrors starting with `label`.

    `own_graph`: the model is a graph ptqconv simplified with onnxruntime already (see
    REAPPLIED_FUSIONS); models a user deploys are loaded as onnxruntime would load them.
    """

    def __init__(self, source: ModelSource, threads: int = 1, level: str = "all",
                 label: str = "model", own_graph: bool = False, prepack: bool = True,
                 config: Mapping[str, str] | None = None) -> None:
        self.label = label
        disabled = REAPPLIED_FUSIONS if own_graph else []
        options = session_options(threads, level, prepack)
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        try:
            with _loadable(source) as loadable:
                self.session = ort.InferenceSession(
                    loadable, options,
                    providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        except Exception as exc:
            raise ModelRefused(label, first_line(exc)) from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str] | None = None,
            sample: str = "a sample") -> dict[str, np.ndarray]:
        """The outputs named in `names` (all outputs when None), by name."""
        fetched = list(self.outputs if names is None else names)
        source = getattr(feeds, "source", "")
        try:
            found = self.session.run(fetched, dict(feeds))
        except Exception as exc:
            # A sample read from the user's files that the model refuses (token ids out of
            # a table's range): the data is wrong, and the files are named.
            kind = PtqUsageError if source and "INVALID_ARGUMENT" in str(exc) else PtqError
            where = f"{sample} ({source})" if source else sample
            raise kind(f"{self.label}: inference failed on {where}: {first_line(exc)}"
                       ) from None
        return dict(zip(fetched, found, strict=True))

    def latency_ms(self, feeds: Mapping[str, np.ndarray], loops: int, warm_up: int) -> float:
        """Median wall time of `loops` runs after `warm_up` runs, in milliseconds."""
        feeds = dict(feeds)
        for _ in range(warm_up):
            self.run(feeds, sample="the latency sample")
        times = []
        for _ in range(loops):
            start = time.perf_counter()
            self.session.run(None, feeds)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000.0


def optimized(source: ModelSource, threads: int = 1) -> ir.Model:
    """The graph onnxruntime runs for `source` with its default (all) optimizations, as it is
    deployed: which Q/DQ groups became integer kernels (docs/reference.md §3). Only the
    structure is for reading; large weights are not loaded."""
    with temporary_directory() as tmp:
        path = tmp / "optimized.onnx"
        options = session_options(threads, prepack=False)  # only the graph is wanted
        options.optimized_model_filepath = str(path)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            with _loadable(source) as loadable:
                ort.InferenceSession(loadable, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelRefused("optimized model", first_line(exc)) from None
        return ir.serde.deserialize_model(onnx.load(str(path), load_external_data=False))


@contextlib.contextmanager
def probe(model: ir.Model, outputs: Sequence[str], threads: int = 1,
          label: str = "model") -> Iterator[Session]:
    """A session over ptqconv's own graph `model` that also returns the values in `outputs`.

    The model is not modified: the extra outputs are added to its output list only while it
    is serialized.
    """
    with probes(model, outputs, [threads], label) as (session,):
        yield session


# A model with at most this many bytes of weights is calibrated by sessions running samples
# side by side (`replicas`): each session holds its own copy of the weights.
REPLICA_MAX_BYTES = 128_000_000


def replicas(threads: int, weight_bytes: int) -> list[int]:
    """The intra-op threads of each session that streams samples through a model: two
    sessions of half the threads, each running every other sample, where there are two
    threads and the weights are small; one session otherwise. On two cores two 1-thread
    sessions of the ResNet-18-sized CNN's calibration graph ran 21 ms a sample against 24-25
    for one of 2 threads (docs/decisions.md, sessions side by side)."""
    if threads < 2 or weight_bytes > REPLICA_MAX_BYTES:
        return [threads]
    return [threads - threads // 2, threads // 2]


@contextlib.contextmanager
def probes(model: ir.Model, outputs: Sequence[str], threads: Sequence[int],
           label: str = "model") -> Iterator[list[Session]]:
    """`probe`'s session, once per entry of `threads` with that many intra-op threads."""
    graph = model.graph
    found = values_by_name(graph)
    original = list(graph.outputs)
    present = {v.name for v in original}
    graph.outputs.extend(found[name] for name in outputs if name not in present)
    try:
        with _loadable(model) as loadable:
            graph.outputs.clear()
            graph.outputs.extend(original)
            sessions = [Session(loadable, n, label=label, own_graph=True) for n in threads]
            del loadable  # serialized bytes as big as the weights; a file stays for the session
            yield sessions
    finally:
        graph.outputs.clear()
        graph.outputs.extend(original)


def stream(
    session: Session | Sequence[Session],
    samples: Iterable[Mapping[str, np.ndarray]],
    names: Sequence[str],
    consume: Callable[[dict[str, np.ndarray]], None],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Run every sample, hand `consume` the named outputs in sample order; inference runs
    ahead (onnxruntime releases the GIL), which hides most of the consumer's cost. Several
    sessions of one model (`replicas`) take turns, sample k going to session k mod n."""
    return stream_together([(session, names)], samples,
                           lambda _, outputs: consume(outputs[0]), progress)


def stream_together(
    runs: Sequence[tuple[Session | Sequence[Session], Sequence[str]]],
    samples: Iterable[Mapping[str, np.ndarray]],
    consume: Callable[[Mapping[str, np.ndarray], list[dict[str, np.ndarray]]], None],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Run every sample through every `(session or its replicas, output names)` of `runs`,
    each session in its own thread, and hand `consume` the sample and the outputs of each
    run in order, in sample order. One sample per session runs ahead of `consume`. Returns
    the number of samples."""
    count = 0
    groups = [([s] if isinstance(s, Session) else list(s), names) for s, names in runs]
    ahead = max(len(sessions) for sessions, _ in groups)
    # One thread per session: a session runs its samples in order, one at a time.
    pools = [[ThreadPoolExecutor(max_workers=1) for _ in sessions] for sessions, _ in groups]

    def submit(index: int, sample: Mapping[str, np.ndarray]) -> list[Future]:
        feeds = sample if isinstance(sample, dict) else dict(sample)  # a Sample keeps its files
        return [pool[index % len(sessions)].submit(
                    sessions[index % len(sessions)].run, feeds, names, f"sample {index}")
                for (sessions, names), pool in zip(groups, pools, strict=True)]

    def finish(sample: Mapping[str, np.ndarray], futures: list[Future]) -> None:
        nonlocal count
        consume(sample, [future.result() for future in futures])
        count += 1
        if progress:
            progress(1)

    pending: deque[tuple[Mapping[str, np.ndarray], list[Future]]] = deque()
    try:
        for index, sample in enumerate(samples):
            pending.append((sample, submit(index, sample)))
            if len(pending) > ahead:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    finally:
        # Interrupted, the samples queued behind the running ones are not started.
        for pool in (p for group in pools for p in group):
            pool.shutdown(wait=True, cancel_futures=True)
    return count


# Latency comparisons: at least MIN_RUNS runs of each model, then more until BUDGET_SECONDS
# have passed, at most MAX_RUNS, except that they last at least MIN_SECONDS: 50 rounds of a
# 40 µs model take 6 ms, where one hiccup moved a copy of the float model to 1.45x the float
# model; over 0.5 s copies agree within 4% (docs/decisions.md, latency timings).
MIN_RUNS, MAX_RUNS, BUDGET_SECONDS, WARM_UP = 10, 50, 2.0, 3
MIN_SECONDS = 0.5
# The residual-sum measurement is a side question of a conversion: a few tenths of a second.
SKIP_LAYER_NORM_BUDGET_S = 0.3


# A timing must beat another by this factor to change the model written or to be called
# faster: the medians of interleaved runs moved by a few percent between runs on a quiet
# machine (docs/decisions.md, latency check).
LATENCY_MARGIN = 1.05
# A timing decides between two models only when the faster one won by LATENCY_MARGIN in
# more rounds than chance would give it at this level (a one-sided sign test): on this 2-core
# VM, mobilenet_v2's two layouts swapped places between runs on medians alone
# (docs/decisions.md, latency timings).
SIGN_TEST_LEVEL = 0.01


@dataclass(frozen=True)
class Latency:
    """Median latencies of models timed against each other on this CPU."""

    ms: dict[str, float]  # label -> median ms
    runs: int  # of each model
    threads: int
    cpu: str  # cpu_description()
    # label -> every round's ms, in round order (rounds pair the models); empty: not kept
    rounds: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def faster(self, a: str, b: str, margin: float = LATENCY_MARGIN) -> bool:
        """Whether `a` runs faster than `b` by `margin`, beyond the noise: by the medians,
        and, where the rounds were kept, in significantly more rounds than not."""
        return not self.not_faster(a, b, margin)

    def not_faster(self, a: str, b: str, margin: float = LATENCY_MARGIN) -> str:
        """Why `a` does not count as faster than `b` ("" when it does, see `faster`)."""
        percent = round((margin - 1) * 100)
        if self.ms[a] * margin >= self.ms[b]:
            return f"not faster by {percent}% on the medians"
        pairs = list(zip(self.rounds.get(a, ()), self.rounds.get(b, ()), strict=False))
        if not pairs:
            return ""
        wins = sum(1 for x, y in pairs if x * margin < y)
        if _binomial_tail(len(pairs), wins) < SIGN_TEST_LEVEL:
            return ""
        return (f"faster by {percent}% in {wins} of {len(pairs)} rounds only, within the "
                "noise")


# The session option that makes onnxruntime fold a constant weight's DequantizeLinear once,
# at load, instead of running it on every inference (it also turns off the QDQ fusions).
DEQUANTIZE_AT_LOAD = {"session.disable_quant_qdq": "1"}
AT_LOAD = "dequantized at load"  # the label of a model timed with DEQUANTIZE_AT_LOAD


def _binomial_tail(n: int, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), in log space (thousands of rounds)."""
    base = math.lgamma(n + 1) - n * math.log(2)
    return math.fsum(math.exp(base - math.lgamma(i + 1) - math.lgamma(n - i + 1))
                     for i in range(k, n + 1))


def compare_latency(models: Mapping[str, ModelSource], feeds: Mapping[str, np.ndarray],
                    threads: int = 0, budget_s: float = BUDGET_SECONDS,
                    session_config: Mapping[str, Mapping[str, str]] | None = None,
                    outputs: dict[str, list[np.ndarray]] | None = None) -> Latency:
    """Time `models` the way a user deploys them (onnxruntime's default session options,
    all graph optimizations, plus the `session_config` entries given for a label),
    interleaved: every round runs each model once, in a shuffled order, so that load from
    other processes hits all of them alike. `threads` 0: as many as the CPU has cores.

    One difference from the defaults: idle intra-op threads spin at most SPIN_US. With
    onnxruntime's unbounded spinning, the threads of the sessions not running kept the cores
    busy, and on 2 cores a model timed beside two others ran at 1.8x its time alone, with
    ratios moving by 0.3 between rounds (docs/decisions.md, latency timings). `outputs`, when
    given, receives each model's outputs on the sample (from its first warm-up run)."""
    threads = threads or usable_cpus()
    sessions = {}
    for label, source in models.items():
        options = session_options(threads)
        for key, value in (session_config or {}).get(label, {}).items():
            options.add_session_config_entry(key, value)
        try:
            with _loadable(source) as loadable:
                sessions[label] = ort.InferenceSession(loadable, options,
                                                       providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelRefused(label, first_line(exc)) from None
    feeds = dict(feeds)
    for label, session in sessions.items():
        try:
            for run in range(WARM_UP):
                got = session.run(None, feeds)
                if outputs is not None and run == 0:
                    outputs[label] = got
        except Exception as exc:
            raise PtqError(f"{label}: onnxruntime cannot run it on the sample: "
                           f"{first_line(exc)}") from None
    times: dict[str, list[float]] = {label: [] for label in sessions}
    order = list(sessions)
    shuffle = random.Random(0).shuffle  # the same order every run of the converter
    start = time.perf_counter()
    rounds = 0

    def more() -> bool:
        elapsed = time.perf_counter() - start
        return rounds < MIN_RUNS or (elapsed < budget_s and (
            rounds < MAX_RUNS or elapsed < min(MIN_SECONDS, budget_s)))

    while more():
        shuffle(order)
        for label in order:
            begin = time.perf_counter()
            sessions[label].run(None, feeds)
            times[label].append(time.perf_counter() - begin)
        rounds += 1
    return Latency({label: statistics.median(t) * 1000.0 for label, t in times.items()},
                   rounds, threads, cpu_description(),
                   {label: tuple(x * 1000.0 for x in t) for label, t in times.items()})


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable); None where
    /proc/meminfo does not say."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def over_half_of_memory(need: int) -> int | None:
    """The bytes available (`available_memory`) where `need` is more than half of them, else
    None: sessions loaded side by side each hold their weights, and must leave room for the
    rest of the machine."""
    available = available_memory()
    return available if available is not None and need > available // 2 else None


def cpu_description() -> str:
    """The CPU's name and the SIMD features onnxruntime's integer kernels depend on
    (docs/reference.md §3), e.g. "AMD EPYC family 25 model 1 (AVX2, no VNNI)"."""
    name = cpu_name()
    from numpy._core._multiarray_umath import __cpu_features__ as features

    if features.get("AVX2"):
        vnni = "VNNI" if features.get("AVX512VNNI") or features.get("AVXVNNI") else "no VNNI"
        return f"{name} (AVX2, {vnni})"
    if features.get("ASIMDDP"):
        return f"{name} (Arm dot product)"
    return name


def skip_layer_norm_ms(hidden: int, tokens: int, threads: int = 0) -> Latency:
    """Add -> LayerNormalization over [1, tokens, hidden] timed as onnxruntime runs it here
    ("fused": its SkipLayerNormalization) against the same sum spelt Sum ("unfused"), which it
    leaves as two kernels (passes/residual_sum.py)."""
    def model(op: str) -> onnx.ModelProto:
        shape = [1, tokens, hidden]
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node(op, ["x", "r"], ["s"]),
             onnx.helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1)],
            "residual", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape)
                         for n in ("x", "r")],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
            [onnx.numpy_helper.from_array(np.ones(hidden, np.float32), "g"),
             onnx.numpy_helper.from_array(np.zeros(hidden, np.float32), "b")])
        return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])

    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, tokens, hidden)).astype(np.float32) for n in "xr"}
    return compare_latency({"fused": model("Add"), "unfused": model("Sum")}, feeds, threads,
                           budget_s=SKIP_LAYER_NORM_BUDGET_S)

