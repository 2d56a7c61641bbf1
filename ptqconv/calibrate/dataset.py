"""Calibration samples stored as raw `.bin` files, read lazily one sample at a time.

Layout (docs/reference.md §1 "Calibration data"): one directory per model input; each file in it
is one sample of that input, raw little-endian values in C order with no header, in the
input's dtype, exactly ``prod(shape) * itemsize`` bytes. The files of a directory are sorted
lexicographically by file name (Python string order, so ``10.bin`` sorts before ``9.bin``: pad
the numbers), the first ``count`` are used, and sample k of the model is file k of every input
directory. Hidden files (names starting with ``.``, such as ``.DS_Store``) and subdirectories
are ignored; every other regular file is data, whatever its suffix.

`CalibrationSet.open` checks everything it can before any long work starts (pairing of
directories with inputs, file counts, shapes, every file's size and, optionally, that float
files hold no NaN/Inf) and raises `PtqUsageError` with a one-line message naming the input,
the file or directory, what was found and what was expected.
"""

from __future__ import annotations

import math
import os
import resource
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ptqconv import modelio
from ptqconv.calibrate.images import ImagePreprocess
from ptqconv.errors import PtqError, PtqUsageError, one_line, shown

Dim = int | str | None

# ONNX packs these several values to a byte; a raw file of them has no agreed layout.
_SUB_BYTE_DTYPES = frozenset(
    {"int4", "uint4", "int2", "uint2", "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn"}
)
_SHAPE_HINT = "--inputShape=name:d0,d1,... or input_shape in the config"


@dataclass(frozen=True)
class InputSpec:
    """One graph input of the model.

    `shape` is the model's declared shape: an int > 0 is a static dimension; a str (symbolic
    name), None or an int <= 0 is dynamic. `shape` is None when the model declares no shape at
    all (unknown rank); such an input needs a user-given shape.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None
    # Of a 4-D input: NHWC when the model transposes it to NCHW first, else NCHW (ONNX's
    # Conv layout).
    layout: str | None = field(default=None, compare=False)


# Transpose(perm=[0, 3, 1, 2]) right after the input: the model takes NHWC (tf2onnx exports).
_NHWC_TO_NCHW = (0, 3, 1, 2)
_NCHW_TO_NHWC = (0, 2, 3, 1)


@dataclass(frozen=True)
class SampleFormat:
    """How the samples' files become model inputs, for the summaries."""

    kind: str  # "bin" | "image"
    model_layouts: tuple[str, ...]  # of the 4-D inputs
    file_layout: str | None  # --inputDataFormat; None: the model's own
    image: str = ""  # the preprocessing steps

    def describe(self) -> str:
        model = "/".join(dict.fromkeys(self.model_layouts))
        if self.kind == "image":
            return f"images, {self.image}, into the model's {model or 'layout'}"
        if not self.model_layouts:
            ignored = (f" (--inputDataFormat={self.file_layout} applies to 4-D inputs only; "
                       "the model has none)" if self.file_layout else "")
            return f".bin samples in the inputs' shapes{ignored}"
        if self.file_layout is None:
            return (f".bin samples in the model's {model} layout (MindSpore's NHWC .bin files: "
                    "--inputDataFormat=NHWC)")
        if self.file_layout == model:
            return f".bin samples in {self.file_layout} (--inputDataFormat), the model's layout"
        return (f".bin samples in {self.file_layout} (--inputDataFormat), transposed to the "
                f"model's {model}")


def model_inputs(model_path: Path, check: bool = True) -> list[InputSpec]:
    """The graph inputs of the model at `model_path` that are not initializers, in graph order.

    Raise PtqError naming the file when it is not a usable model (modelio.load_model, whose
    full check `check` False skips for a model checked before), and naming the input when an
    input is not a tensor of a numpy type.
    """
    model_path = Path(model_path)
    return graph_inputs(modelio.load_model(model_path, check=check).graph, model_path)


def graph_inputs(graph: ir.Graph, source: Path | None = None) -> list[InputSpec]:
    """Input specs of an already loaded model: its graph inputs (initializers are not inputs).
    `source` names the model file in messages."""
    where = f"{shown(source)}: " if source is not None else ""
    specs = []
    for value in graph.inputs:
        if value.name in graph.initializers:
            continue
        if not isinstance(value.type, ir.TensorType):
            kind = type(value.type).__name__.removesuffix("Type").lower() if value.type \
                else "value of no type"
            raise PtqError(f"{where}model input {value.name!r} is a {kind}, not a tensor; "
                           "calibration data can only feed tensors")
        if value.dtype is None or value.dtype.numpy() is None:
            raise PtqError(f"{where}model input {value.name!r} has element type "
                           f"{value.dtype}, which numpy cannot hold")
        shape = None if value.shape is None else tuple(
            d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape)
        layout = None
        if shape is not None and len(shape) == 4:
            users = [node for node, _ in value.uses()]
            nhwc = bool(users) and all(
                n.op_type == "Transpose" and n.attributes.get("perm") is not None
                and tuple(n.attributes["perm"].as_ints()) == _NHWC_TO_NCHW for n in users)
            layout = "NHWC" if nhwc else "NCHW"
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), shape, layout))
    return specs


class CalibrationSet:
    """Calibration samples of a model, checked up front and read lazily from disk.

    Build it with `CalibrationSet.open`. Iterating yields one ``{input name: array}`` dict per
    sample, each array with the resolved shape in `shapes`, reading one file per input at a
    time; the set can be iterated any number of times.
    """

    inputs: tuple[InputSpec, ...]
    shapes: dict[str, tuple[int, ...]]
    files: dict[str, list[Path]]

    def __init__(
        self,
        inputs: tuple[InputSpec, ...],
        shapes: dict[str, tuple[int, ...]],
        files: dict[str, list[Path]],
        what: str = "calibration data",
        layout: str | None = None,
        image: ImagePreprocess | None = None,
        axes: Mapping[str, int] | None = None,
        shortest: Mapping[str, int] | None = None,
    ) -> None:
        self.inputs = inputs
        self.shapes = shapes  # the largest sample's where lengths vary
        self.files = files
        self.layout = layout  # of 4-D .bin files; None: the model's
        self.image = image
        # Inputs with a dimension read from each file's size (input -> axis), and the
        # shortest length read there (`shapes` holds the longest).
        self.axes = dict(axes or {})
        self.shortest = dict(shortest or {})
        self._what = what
        self._count = min((len(f) for f in files.values()), default=0)
        # Inputs whose samples (more than one) are all the same bytes: ranges fit one sample.
        self.identical: tuple[str, ...] = ()
        # Samples whose largest magnitude stands far above the others' (read with the values).
        self.outliers: tuple[OutlierSample, ...] = ()

    @property
    def inferred(self) -> frozenset[str]:
        """Inputs whose shape has a dimension read from the files' sizes."""
        return frozenset(self.axes)

    @property
    def format(self) -> SampleFormat:
        layouts = tuple(s.layout for s in self.inputs if s.layout is not None)
        return SampleFormat("image" if self.image else "bin", layouts, self.layout,
                            self.image.describe() if self.image else "")

    @classmethod
    def open(
        cls,
        inputs: Sequence[InputSpec],
        paths: Sequence[tuple[str | None, Path]],
        count: int,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        check_values: bool = True,
        what: str = "calibration data",
        layout: str | None = None,
        image: ImagePreprocess | None = None,
        count_given: str | None = None,
    ) -> CalibrationSet:
        """Pair directories with model inputs, resolve shapes and check every used file.

        `paths` holds ``(input name, directory)`` pairs. With every name None the directories
        pair with `inputs` by position (MindSpore's flat ``image_path``); otherwise every name
        must be given, be a model input, appear once, and every model input needs a directory.
        At most `count` files per directory are used (fewer is fine, none is an error), unless
        `count_given` says where `count` was asked for: then fewer files is an error, as in
        MindSpore.
        `shapes` (from ``--inputShape`` or the config's ``input_shape``) fixes dynamic
        dimensions; a single dimension still dynamic is read from each file's size, so the
        samples of a sequence model may differ in length.
        With `check_values`, float files are read once to reject NaN/Inf (and bool files to
        reject bytes other than 0 and 1). `what` starts every message. `layout` is the
        layout of 4-D `.bin` files (--inputDataFormat; None: the model's). With `image` the
        files are images, decoded and preprocessed into the model's layout when read; their
        headers are checked here.

        Raise PtqUsageError (one line naming the input, the file or directory, what was found
        and what was expected) for any problem with the data or the shapes, PtqError for a
        model input whose type cannot be stored in a raw file.
        """
        inputs = tuple(inputs)
        if count < 1:
            raise PtqUsageError(f"{what}: the sample count must be at least 1, not {count}")
        if not inputs:
            raise PtqUsageError(f"{what}: the model has no inputs to calibrate")
        _check_storable(inputs, what)
        dirs = _pair(inputs, paths, what)
        user_shapes = check_user_shapes(inputs, shapes or {}, what)

        all_files = {spec.name: _list_dir(spec.name, dirs[spec.name], what) for spec in inputs}
        first = inputs[0].name
        for spec in inputs[1:]:
            a, b = len(all_files[first]), len(all_files[spec.name])
            if a != b:
                stray = [p for name in (first, spec.name) for p in all_files[name]
                         if p.suffix.lower() != ".bin"]
                also = (f" ({shown(stray[0])} is no .bin file: {NOT_A_SAMPLE})" if stray
                        else "")
                raise PtqUsageError(
                    f"{what}: input {first!r} has {a} files in {shown(dirs[first])} but input "
                    f"{spec.name!r} has {b} files in {shown(dirs[spec.name])}; sample k is file k "
                    f"of every input directory, so the counts must be equal{also}"
                )
        if count_given is not None and len(all_files[first]) < count:
            raise PtqUsageError(
                f"{count_given}: {count} samples asked for, but input {first!r} has only "
                f"{_files(len(all_files[first]))} in {shown(dirs[first])}; lower it or add "
                "files")
        n = min(count, len(all_files[first]))
        files = {name: f[:n] for name, f in all_files.items()}
        if image is not None:
            resolved = {spec.name: _image_shape(spec, image, user_shapes.get(spec.name),
                                                files[spec.name], what) for spec in inputs}
            return cls(inputs, resolved, files, what, layout, image)

        resolved: dict[str, tuple[int, ...]] = {}
        axes: dict[str, int] = {}
        shortest: dict[str, int] = {}
        for spec in inputs:
            shape, axis = _resolve_shape(spec, user_shapes.get(spec.name),
                                         files[spec.name][0], what)
            resolved[spec.name] = shape
            if axis is not None:
                axes[spec.name] = axis

        for spec in inputs:
            shape, axis = resolved[spec.name], axes.get(spec.name)
            if axis is None:
                others = {s.name: (s, resolved[s.name]) for s in inputs
                          if s is not spec and s.name not in axes}
                for path in files[spec.name]:
                    _check_size(spec, shape, path, what, "", others)
            else:
                lengths = [_length(spec, shape, axis, path, what) for path in files[spec.name]]
                resolved[spec.name] = _with(shape, axis, max(lengths))
                shortest[spec.name] = min(lengths)
            _check_memory(spec, resolved[spec.name], what,
                          blame_model=spec.name not in user_shapes and axis is None)

        data = cls(inputs, resolved, files, what, layout, axes=axes, shortest=shortest)
        if check_values:
            for spec in inputs:
                sized = spec.name in axes
                peaks = [(path, _check_values(spec, data.sample_shape(spec, path), path, what,
                                              sized)) for path in files[spec.name]]
                data.outliers += outlying(spec.name, [(p, m) for p, m in peaks
                                                      if m is not None])
        data.identical = tuple(spec.name for spec in inputs
                               if _all_same(files[spec.name][:count]))
        return data

    @classmethod
    def from_files(
        cls,
        inputs: Sequence[InputSpec],
        files: Sequence[Path],
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        what: str = "--inDataFile",
        layout: str | None = None,
        image: ImagePreprocess | None = None,
    ) -> CalibrationSet:
        """One sample from one `.bin` file (or image) per input (paired by position),
        checked as `open` checks a directory's files (shape resolution, size, NaN/Inf)."""
        inputs = tuple(inputs)
        listed = ", ".join(repr(s.name) for s in inputs)
        if not inputs:
            raise PtqUsageError(f"{what}: the model has no inputs to feed")
        if len(files) != len(inputs):
            raise PtqUsageError(
                f"{what}: {len(files)} file(s) given for {len(inputs)} model input(s) "
                f"({listed}); give one .bin file per input, in the model's input order, "
                "separated by ','")
        _check_storable(inputs, what)
        user = check_user_shapes(inputs, shapes or {}, what)
        resolved: dict[str, tuple[int, ...]] = {}
        for spec, path in zip(inputs, files, strict=True):
            if not path.exists():
                raise PtqUsageError(f"{what}: input {spec.name!r}: no such file: {shown(path)}")
            if not path.is_file():
                raise PtqUsageError(f"{what}: input {spec.name!r}: not a file: {shown(path)}")
            if image is not None:
                resolved[spec.name] = _image_shape(spec, image, user.get(spec.name), [path],
                                                   what)
                continue
            shape, axis = _resolve_shape(spec, user.get(spec.name), path, what)
            _check_size(spec, shape, path, what, ", inferred from the file size"
                        if axis is not None else "")
            _check_memory(spec, shape, what,
                          blame_model=spec.name not in user and axis is None)
            _check_values(spec, shape, path, what, axis is not None)
            resolved[spec.name] = shape
        return cls(inputs, resolved, {s.name: [p] for s, p in zip(inputs, files, strict=True)},
                   what, layout, image)

    def subset(self, indices: Sequence[int]) -> CalibrationSet:
        """The samples at `indices`, in that order (read lazily like every sample)."""
        return CalibrationSet(self.inputs, self.shapes,
                              {name: [files[i] for i in indices]
                               for name, files in self.files.items()}, self._what,
                              self.layout, self.image, self.axes, self.shortest)

    @property
    def what(self) -> str:
        """What the samples are for ("calibration data", "eval data", a flag)."""
        return self._what

    def __len__(self) -> int:
        """The number of samples used."""
        return self._count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Sample k as ``{name: array}`` (a `Sample`, naming its files), each array read from
        disk when the sample is due."""
        for k in range(self._count):
            paths = [self.files[spec.name][k] for spec in self.inputs]
            yield Sample({spec.name: self._sample(spec, path)
                          for spec, path in zip(self.inputs, paths, strict=True)},
                         ", ".join(shown(p) for p in paths))

    def sample_shape(self, spec: InputSpec, path: Path) -> tuple[int, ...]:
        """The shape of `spec`'s sample in the file `path` (checked by `open`)."""
        shape, axis = self.shapes[spec.name], self.axes.get(spec.name)
        if axis is None:
            return shape
        return _with(shape, axis, _length(spec, shape, axis, path, self._what))

    def _sample(self, spec: InputSpec, path: Path) -> np.ndarray:
        shape = self.shapes[spec.name]
        if self.image is not None:
            pixels = self.image.load(path, self._what, spec.name)  # height x width x channels
            if spec.layout == "NCHW":
                pixels = pixels.transpose(2, 0, 1)
            if pixels.shape != shape[1:]:
                raise PtqUsageError(
                    f"{self._what}: input {spec.name!r}: {shown(path)} gives "
                    f"{_fmt(pixels.shape)} after preprocessing; expected {_fmt(shape[1:])} "
                    "like the other images")
            return pixels.reshape(shape).astype(spec.dtype)
        shape = self.sample_shape(spec, path)
        if self.layout is None or spec.layout is None or self.layout == spec.layout:
            return _read(spec, shape, path, self._what)
        # The file holds the other 4-D layout: read it as such, then transpose.
        to_file = _NCHW_TO_NHWC if self.layout == "NHWC" else _NHWC_TO_NCHW
        stored = _read(spec, tuple(shape[i] for i in to_file), path, self._what)
        return np.ascontiguousarray(stored.transpose(np.argsort(to_file)))

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{s.name}: {s.dtype.name} {_fmt(self.shapes[s.name])}" for s in self.inputs
        )
        return f"CalibrationSet({len(self)} samples; {shapes})"


def _image_shape(spec: InputSpec, image: ImagePreprocess, user: tuple[int, ...] | None,
                 paths: Sequence[Path], what: str) -> tuple[int, ...]:
    """The sample shape of a 4-D input fed preprocessed images, checked against the model
    (and --inputShape) from every image's header."""
    where = f"{what}: input {spec.name!r}"
    if spec.shape is None or len(spec.shape) != 4 or spec.layout is None:
        raise PtqUsageError(f"{where}: input_type=IMAGE feeds 4-D image inputs; this input is "
                            f"{_fmt(spec.shape)} (give it .bin samples)")
    if not (_is_float(spec.dtype) or (spec.dtype == np.uint8 and image.mean is None)):
        raise PtqUsageError(f"{where}: input_type=IMAGE feeds float inputs (or uint8 without "
                            f"normalize_mean/std); this input is {spec.dtype.name}")
    height, width = image.output_size(paths[0], what, spec.name)
    for path in paths[1:]:
        size = image.output_size(path, what, spec.name)
        if size != (height, width):
            raise PtqUsageError(
                f"{where}: {shown(path)} is {size[1]}x{size[0]} after preprocessing but "
                f"{shown(paths[0])} is {width}x{height}; set resize_width/resize_height or "
                "center_crop_width/center_crop_height so every image has the model's size")
    hwc = (height, width, image.channels)
    shape = (1, image.channels, height, width) if spec.layout == "NCHW" else (1, *hwc)
    model = user if user is not None else spec.shape
    if len(model) != 4:
        raise PtqUsageError(f"{where}: input shape {_fmt(model)} is not 4-D")
    for i, (got, want) in enumerate(zip(shape, model, strict=True)):
        if not _is_dynamic(want) and got != want:
            raise PtqUsageError(
                f"{where}: images give {_fmt(shape)} ({width}x{height}, {image.channels} "
                f"channel{'s' if image.channels > 1 else ''}, {spec.layout}) but the model "
                f"takes {_fmt(model)} (dimension {i}); set resize_width/resize_height, "
                "center_crop_width/center_crop_height or image_to_format")
    return shape


def _check_storable(inputs: Sequence[InputSpec], what: str) -> None:
    for spec in inputs:
        if spec.dtype.kind == "O" or spec.dtype.name in _SUB_BYTE_DTYPES:
            raise PtqError(
                f"{what}: input {spec.name!r} has type {spec.dtype.name}, which raw .bin "
                "files cannot hold (only types of whole bytes per value)")


def memory_limit() -> int:
    """Bytes this process may hold at most: the machine's memory, or less under a limit."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft, _ = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY:
            limit = min(limit, soft)
    return limit


def _check_memory(spec: InputSpec, shape: tuple[int, ...], what: str,
                  blame_model: bool) -> None:
    """Refuse, before anything is allocated, a sample that could never be held in memory
    (a huge declared shape with a sparse file of that size would otherwise end as "out of
    memory" with no culprit). A shape the model declares makes the model the culprit (exit
    status 1); one given or read from a file makes the data the culprit (2)."""
    needed = math.prod(shape) * spec.dtype.itemsize
    limit = memory_limit()
    if needed > limit:
        error = PtqError if blame_model else PtqUsageError
        raise error(
            f"{what}: input {spec.name!r}: one sample of {spec.dtype.name} {_fmt(shape)} "
            f"needs {needed} bytes ({needed / 2**30:.1f} GiB), more than the "
            f"{limit / 2**30:.1f} GiB of memory this process may use")


# dtypes samples are commonly saved in, by mistake or by numpy's default.
# What a file that is not named .bin and does not fit is asked (a note or a listing left
# in a sample directory).
NOT_A_SAMPLE = "is it a sample? Every file of the directory but hidden ones is read as one"
SAVED_DTYPES = tuple(np.dtype(d) for d in ("float64", "float32", "float16", "int64", "int32"))


def _check_size(spec: InputSpec, shape: tuple[int, ...], path: Path, what: str,
                origin: str,
                others: Mapping[str, tuple[InputSpec, tuple[int, ...]]] | None = None) -> None:
    """The file holds one sample of `spec` in `shape`; else a one-line error with the likely
    causes: another input's sample (`others`: directories in the wrong order), another
    dtype, several samples, a file that is no sample at all."""
    expected = math.prod(shape) * spec.dtype.itemsize
    size = _size(spec.name, path, what)
    if size != expected:
        fixed = bool(spec.shape) and not _is_dynamic(spec.shape[0])
        # A sample saved in another dtype (numpy's default float64; float32 samples of a
        # float16 model) is as likely as several samples in one file: both are named.
        sizes = [f"a sample of input {name!r} ({o.dtype.name} {_fmt(s)}: directories in the "
                 "wrong order?)" for name, (o, s) in (others or {}).items()
                 if size == math.prod(s) * o.dtype.itemsize]
        other = next((d for d in sorted(SAVED_DTYPES, key=lambda d: d.kind != spec.dtype.kind)
                      if d != spec.dtype and expected
                      and size == expected // spec.dtype.itemsize * d.itemsize), None)
        if other is not None:
            sizes.append(f"one sample of {other.name} values (the model takes "
                         f"{spec.dtype.name}: save them with .astype(numpy.{spec.dtype.name}))")
        if expected and size > expected and size % expected == 0:
            sizes.append(f"{size // expected} samples (one file is one sample"
                         + (f", and the model's batch dimension is fixed at {shape[0]}"
                            if fixed else "") + ")")
        hint = f"; that is the size of {' or of '.join(sizes)}" if sizes else ""
        if path.suffix.lower() != ".bin":
            hint += f"; {NOT_A_SAMPLE}"
        raise PtqUsageError(
            f"{what}: input {spec.name!r}: {shown(path)} is {size} bytes; expected {expected} "
            f"({spec.dtype.name} {_fmt(shape)}{origin}){hint}")


def _pair(
    inputs: tuple[InputSpec, ...], paths: Sequence[tuple[str | None, Path]], what: str
) -> dict[str, Path]:
    """Map every model input name to its directory."""
    names = [s.name for s in inputs]
    listed = ", ".join(repr(n) for n in names)
    if not paths:
        raise PtqUsageError(f"{what}: no directories given for model inputs {listed}")
    keys = [name for name, _ in paths]
    if all(k is None for k in keys):
        if len(paths) != len(inputs):
            raise PtqUsageError(
                f"{what}: {len(paths)} directories given by position for {len(inputs)} model "
                f"inputs ({listed}); give one directory per input, in the model's input order"
            )
        paired = {name: Path(d) for name, (_, d) in zip(names, paths, strict=True)}
        for name, directory in paired.items():
            # Paired by position, a directory named after another input is in the wrong place.
            other = next((n for n in names if n != name
                          and n.lower() == directory.name.lower()), None)
            if other is not None:
                raise PtqUsageError(
                    f"{what}: directory {shown(directory)}, given by position for input "
                    f"{name!r}, is named after input {other!r}; give the directories in the "
                    f"model's input order ({listed}) or by name (input:dir)")
        return paired
    if any(k is None for k in keys):
        raise PtqUsageError(
            f"{what}: some directories are named by input and some are not; name every one "
            f"(input:dir) or none (model inputs: {listed})"
        )
    dirs: dict[str, Path] = {}
    for name, d in paths:
        assert name is not None
        if name not in names:
            raise PtqUsageError(
                f"{what}: {name!r} (directory {shown(Path(d))}) is not an input of the model; "
                f"model inputs: {listed}"
            )
        if name in dirs:
            raise PtqUsageError(
                f"{what}: input {name!r} is given twice: {shown(dirs[name])} and {shown(Path(d))}"
            )
        dirs[name] = Path(d)
    missing = [n for n in names if n not in dirs]
    if missing:
        raise PtqUsageError(
            f"{what}: no directory for model input(s) {', '.join(repr(n) for n in missing)}; "
            f"every input needs one (model inputs: {listed})"
        )
    return dirs


def check_user_shapes(
    inputs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]], what: str
) -> dict[str, tuple[int, ...]]:
    """`shapes` by input name, each for an input of the model and of positive dimensions."""
    names = [s.name for s in inputs]
    result = {}
    for name, shape in shapes.items():
        if name not in names:
            raise PtqUsageError(
                f"{what}: an input shape is given for {name!r}, which is not an input of the "
                f"model; model inputs: {', '.join(repr(n) for n in names)}"
            )
        shape = tuple(shape)
        if not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
            raise PtqUsageError(
                f"{what}: input {name!r}: input shape {_fmt(shape)} must hold positive integers"
            )
        result[name] = tuple(int(d) for d in shape)
    return result


def _resolve_shape(
    spec: InputSpec, user: tuple[int, ...] | None, first_file: Path, what: str
) -> tuple[tuple[int, ...], int | None]:
    """The concrete shape of one sample of `spec` (in `first_file`), and the axis of the
    dimension read from the file's size (None: none was)."""
    model = spec.shape
    if user is not None:
        if model is not None:
            if len(user) != len(model):
                raise PtqUsageError(
                    f"{what}: input {spec.name!r}: input shape {_fmt(user)} has rank {len(user)} "
                    f"but the model's shape {_fmt(model)} has rank {len(model)}"
                )
            for i, (u, m) in enumerate(zip(user, model, strict=True)):
                if not _is_dynamic(m) and u != m:
                    raise PtqUsageError(
                        f"{what}: input {spec.name!r}: input shape {_fmt(user)} disagrees with "
                        f"the model's shape {_fmt(model)} at dimension {i} ({u} vs {m})"
                    )
        return user, None
    if model is None:
        raise PtqUsageError(
            f"{what}: input {spec.name!r}: the model declares no shape (unknown rank), so the "
            f"shape of a sample cannot be inferred; pass {_hint(spec)}"
        )
    unknown = [i for i, d in enumerate(model) if _is_dynamic(d)]
    if not unknown:
        return tuple(int(d) for d in model), None
    if len(unknown) > 1 and unknown[0] == 0:
        # One file holds one sample: a dynamic leading (batch) dimension is 1.
        model = (1, *model[1:])
        unknown = unknown[1:]
    if len(unknown) > 1:
        raise PtqUsageError(
            f"{what}: input {spec.name!r}: model shape {_fmt(spec.shape)} has {len(unknown)} "
            f"dynamic dimensions besides the batch, too many to infer from the file size; "
            f"pass {_hint(spec)}"
        )
    known = math.prod(int(d) for d in model if not _is_dynamic(d))
    unit = known * spec.dtype.itemsize
    size = _size(spec.name, first_file, what)
    if size == 0 or size % unit:
        fix = f"pass {_hint(spec)}" if first_file.suffix.lower() == ".bin" else NOT_A_SAMPLE
        raise PtqUsageError(
            f"{what}: input {spec.name!r}: {shown(first_file)} is {size} bytes, not a positive "
            f"multiple of {unit} ({spec.dtype.name} {_fmt(model)} without dimension "
            f"{unknown[0]}), so dimension {unknown[0]} cannot be inferred; {fix}"
        )
    shape = tuple(size // unit if i == unknown[0] else int(d) for i, d in enumerate(model))
    return shape, unknown[0]


def _with(shape: tuple[int, ...], axis: int, length: int) -> tuple[int, ...]:
    return (*shape[:axis], length, *shape[axis + 1:])


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _length(spec: InputSpec, shape: tuple[int, ...], axis: int, path: Path, what: str) -> int:
    """The length along `axis` of the sample in `path`, read from the file's size."""
    unit = math.prod(_with(shape, axis, 1)) * spec.dtype.itemsize
    size = _size(spec.name, path, what)
    if size == 0 or size % unit:
        dims = ",".join("?" if i == axis else str(d) for i, d in enumerate(shape))
        raise PtqUsageError(
            f"{what}: input {spec.name!r}: {shown(path)} is {size} bytes, not a positive "
            f"multiple of {unit} ({spec.dtype.name} [{dims}], dimension {axis} read from "
            f"each file's size); pass {_hint(spec)} if the files are of another shape")
    return size // unit


def _all_same(paths: Sequence[Path]) -> bool:
    """Whether more than one file holds the same bytes (read until two differ: two files
    in the usual case)."""
    if len(paths) < 2:
        return False
    try:
        if len({p.stat().st_size for p in paths}) > 1:
            return False
        first = paths[0].read_bytes()
        return all(p.read_bytes() == first for p in paths[1:])
    except OSError:
        return False


class Sample(dict):
    """One sample's arrays by input name, and `source`: the files they were read from, for
    a message about the sample (onnxruntime refusing its values)."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str = "") -> None:
        super().__init__(arrays)
        self.source = source


@dataclass(frozen=True)
class OutlierSample:
    """A sample of `input` whose largest magnitude, `peak`, is `OUTLIER_RATIO` or more times
    the median sample's, `median`: a corrupted or unnormalized file sets every MAX_MIN range
    it reaches."""

    input: str
    path: Path
    peak: float
    median: float


# A sample's largest magnitude this many times the median sample's is an outlier: one image
# in 0-255 among images in 0-1 is 255x; natural spread (quiet and loud audio, dark and
# bright images) stays within a few times, and quieter samples are not flagged at all.
OUTLIER_RATIO = 100.0
# Flagged only where the median means something and outliers are few (one in 20 at most):
# many samples that far above the median are a distribution, not a stray file.
OUTLIER_MIN_SAMPLES = 8


def outlying(name: str, peaks: Sequence[tuple[Path, float]]) -> tuple[OutlierSample, ...]:
    """The samples of input `name` whose peak (largest magnitude) is an outlier."""
    if len(peaks) < OUTLIER_MIN_SAMPLES:
        return ()
    median = float(np.median([peak for _, peak in peaks]))
    if not median > 0:
        return ()
    found = tuple(OutlierSample(name, path, peak, median) for path, peak in peaks
                  if peak >= OUTLIER_RATIO * median)
    return found if len(found) <= max(1, len(peaks) // 20) else ()


def _check_values(spec: InputSpec, shape: tuple[int, ...], path: Path, what: str,
                  sized: bool = False) -> float | None:
    """Refuse NaN / Inf (and bool bytes other than 0 and 1), and float32 files that hold
    float64 values (`sized`: a dimension was read from the file's size, which a float64 file
    passes); a float sample's largest magnitude."""
    dtype = spec.dtype
    if dtype.kind == "b":
        raw = _load(spec.name, path, np.dtype(np.uint8), math.prod(shape), what)
        bad = np.flatnonzero(raw > 1)
        if bad.size:
            i = int(bad[0])
            raise PtqUsageError(
                f"{what}: input {spec.name!r}: {shown(path)} has byte {int(raw[i])} at index "
                f"{_index(i, shape)} (flat {i}; {bad.size} such bytes); bool "
                "data must be 0 or 1"
            )
        return None
    if not _is_float(dtype):
        return None
    arr = _load(spec.name, path, dtype, math.prod(shape), what)
    if dtype == np.float32 and _float64_of_float32(arr, sized):
        raise PtqUsageError(
            f"{what}: input {spec.name!r}: {shown(path)} holds float64 values, it seems (its "
            "32-bit words pair up into float64 numbers; numpy saves float64 unless told): the "
            "model takes float32; save them with .astype(numpy.float32)")
    finite = np.isfinite(arr)
    if finite.all():
        return float(np.abs(arr).max(initial=0.0))
    bad = np.flatnonzero(~finite)
    i = int(bad[0])
    kind = "NaN" if np.isnan(arr[i]) else "Inf"
    raise PtqUsageError(
        f"{what}: input {spec.name!r}: {shown(path)} holds {kind} at index "
        f"{_index(i, shape)} (flat {i}; {bad.size} non-finite values in the "
        f"file, {dtype.name} {_fmt(shape)}); calibration data must be finite"
    )


def _float64_of_float32(arr: np.ndarray, loose: bool = False) -> bool:
    """Whether the float32 reading `arr` of a file is float64 values (numpy's default dtype).
    A file of them passes the size check where a dimension is read from the size, as two
    samples of garbage (`loose`: that is the case).

    Always told: float32 numbers saved as float64, whose low words have their low 29 bits
    zero. Where `loose`, also: short values (whole numbers, k/16), whose low words are all
    zero (the float32 reading is 0 at every even place), and any float64 data whose float32
    reading at even places (the low words, random bits) is absurd in a quarter of them or
    more (not 0 and below 1e-20 or beyond 1e20, or not finite); in both
    the float64 reading must look like data: finite, within 2**24, 3 distinct values not 0
    or more (a 0 / 1 mask at odd places pairs into {0, 2**-7})."""
    if arr.size % 2:
        return False
    words = arr.view(np.uint32).reshape(-1, 2)  # little-endian: each float64's low, high word
    low = words[:, 0]
    # Its top 3 bits are the float32 mantissa's last 3, set in 7 values of 8; at least 8 set
    # ones are asked for (float32 data with 8 such words is 2.0 there).
    if np.count_nonzero(low) >= 8 and not (low & 0x1FFFFFFF).any():
        return True
    if not loose or np.count_nonzero(words[:, 1]) < 8:
        return False
    wide = arr.view(np.float64)
    plausible = bool(np.all(np.abs(wide) <= 2.0**24)  # False for NaN too
                     and np.unique(wide[wide != 0]).size >= 3)
    if not plausible:
        return False
    if not low.any():
        return True
    with np.errstate(invalid="ignore", over="ignore"):
        magnitude = np.abs(arr[0::2])
        absurd = ~((magnitude == 0) | ((magnitude >= 1e-20) & (magnitude <= 1e20)))
    return bool(4 * np.count_nonzero(absurd) >= absurd.size)


def _is_float(dtype: np.dtype) -> bool:
    # ml_dtypes' bfloat16 / float8 types have kind 'V' but support np.isfinite.
    return dtype.kind in "fc" or dtype.name.startswith(("float", "bfloat"))


def _read(spec: InputSpec, shape: tuple[int, ...], path: Path, what: str) -> np.ndarray:
    n = math.prod(shape)
    arr = _load(spec.name, path, spec.dtype, n, what)
    if arr.size != n:
        raise PtqError(
            f"{what}: input {spec.name!r}: {shown(path)} now holds {arr.size} values; "
            f"expected {n} ({spec.dtype.name} {_fmt(shape)}); did it change after the check?"
        )
    return arr.reshape(shape)


def _load(name: str, path: Path, dtype: np.dtype, n: int, what: str) -> np.ndarray:
    """Read up to `n` little-endian values of `dtype` from `path` as a native-order array."""
    file_dtype = dtype.newbyteorder("<") if dtype.kind in "iufc" else dtype
    try:
        arr = np.fromfile(path, dtype=file_dtype, count=n)
    except OSError as exc:
        raise PtqUsageError(
            f"{what}: input {name!r}: cannot read {shown(path)}: {exc.strerror or exc}"
        ) from None
    return arr if file_dtype == dtype else arr.astype(dtype)


def _list_dir(name: str, directory: Path, what: str) -> list[Path]:
    """The data files of `directory`, sorted by file name; hidden files are skipped."""
    where = f"{what}: input {name!r}: directory {shown(directory)}"
    if not directory.exists():
        raise PtqUsageError(f"{where} does not exist")
    if not directory.is_dir():
        raise PtqUsageError(f"{where} is not a directory")
    names = []
    try:
        with os.scandir(directory) as it:
            for entry in sorted(it, key=lambda e: e.name):
                if entry.name.startswith(".") or entry.is_dir():
                    continue
                if not entry.is_file():
                    # Reading a FIFO or a device would hang or never end.
                    raise PtqUsageError(f"{where}: {shown(entry.name)} is {_kind(entry)}, not "
                                        "a regular file; every file of the directory but "
                                        "hidden ones is read as a sample")
                names.append(entry.name)
    except OSError as exc:
        raise PtqUsageError(f"{where} cannot be listed: {exc.strerror or exc}") from None
    if not names:
        raise PtqUsageError(f"{where} has no data files (hidden files are ignored)")
    return [directory / n for n in names]


def _kind(entry: os.DirEntry) -> str:
    try:
        mode = entry.stat().st_mode
    except OSError:
        return "a broken symbolic link"
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _size(name: str, path: Path, what: str) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise PtqUsageError(
            f"{what}: input {name!r}: cannot read {shown(path)}: {exc.strerror or exc}"
        ) from None


def _is_dynamic(d: Dim) -> bool:
    return not isinstance(d, (int, np.integer)) or d <= 0


def _fmt(shape) -> str:
    """A shape as ``[1,3,H,?]``: symbolic dims by name, unnamed dynamic dims as ``?``."""
    if shape is None:
        return "[unknown rank]"
    parts = []
    for d in shape:
        if isinstance(d, str):
            parts.append(one_line(d))
        elif d is None or (isinstance(d, (int, np.integer)) and d <= 0):
            parts.append("?")
        else:
            parts.append(str(int(d)))
    return "[" + ",".join(parts) + "]"


def _index(flat: int, shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]"


def _hint(spec: InputSpec) -> str:
    if spec.shape is None:
        return _SHAPE_HINT.replace("name", one_line(spec.name), 1)
    dims = ",".join(str(d) if not _is_dynamic(d) else f"d{i}" for i, d in enumerate(spec.shape))
    return f"--inputShape={one_line(spec.name)}:{dims} or input_shape in the config"



