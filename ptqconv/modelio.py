"""Load and save ONNX models through onnx-ir: validation, opset upgrades, atomic writes."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.helper
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ptqconv import piecewise_parse
from ptqconv.errors import PtqError, shown
from ptqconv.files import Staging, is_utf8, os_reason, regular_file_size, write_failure
from ptqconv.graph.initializers import release_mapping
from ptqconv.runtime import (
    IN_MEMORY_BYTES,
    ORT_LOG_LEVEL,
    ModelRefused,
    Session,
    first_line,
    path_source,
    release_memory,
    skip_prepacking,
)

# docs/reference.md §3: onnxruntime 1.31 refuses models above opset 26 and IR version 13.
MAX_ORT_OPSET = 26
MAX_ORT_IR_VERSION = 13
# Protobuf refuses messages of 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
MAX_PROTO_BYTES = 2**31 - 1

_PLACEHOLDER = "ptqconv-detached-weight"
# docs/reference.md §3: per-axis DequantizeLinear needs 13, 16-bit and 4-bit types 21, 2-bit 25.
_OPSET_FOR_TYPE = {
    ir.DataType.INT8: 13,
    ir.DataType.UINT8: 13,
    ir.DataType.INT16: 21,
    ir.DataType.UINT16: 21,
    ir.DataType.INT4: 21,
    ir.DataType.UINT4: 21,
    ir.DataType.INT2: 25,
    ir.DataType.UINT2: 25,
}


# Tensors of at least this many bytes are written to the simplified model's data file.
SIMPLIFIED_EXTERNAL_BYTES = 1 << 20


def simplify_with_onnxruntime(path: Path, workdir: Path, size: int | None = None) -> Path:
    """The float model after onnxruntime's basic (hardware-independent) graph optimizations.

    They fold BatchNormalization and constant Mul/Add into Conv and fold constants, as
    onnxruntime's quant_pre_process does; quantizing a conv output before a per-channel
    rescale amplifies the noise of small channels. The result has only standard ONNX ops.
    `size` is the model's bytes with its data files, when the caller knows them.
    """
    import onnxruntime as ort

    out = workdir / "simplified.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.log_severity_level = ORT_LOG_LEVEL
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", "simplified.onnx.data")
    # A big model's weights go to a data file that onnx-ir then maps instead of reading:
    # parsing them into a protobuf first peaked at 1.07 GB for BERT-base, against 0.72 GB
    # (docs/decisions.md). A small one stays one file, which sessions take as bytes.
    # The file alone can decide, without parsing it for its data files.
    if size is None:
        size = path.stat().st_size
        size = size if size > IN_MEMORY_BYTES else model_size(path)
    big = size > IN_MEMORY_BYTES
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes",
        str(SIMPLIFIED_EXTERNAL_BYTES if big else 1 << 30))
    # This session only writes the graph, it never runs: packing the weights for the GEMM
    # kernels would copy them all (BERT-base: peak 716 MB with, 392 MB without, 2.8 s / 1.3 s).
    skip_prepacking(options)
    try:
        ort.InferenceSession(path_source(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if out.exists():
            # onnxruntime got as far as writing: the temporary directory is the culprit.
            reason = write_failure(workdir, path.stat().st_size) or "the write failed"
            raise PtqError(f"cannot write the simplified model to the temporary directory "
                           f"{shown(workdir)} (TMPDIR): {reason}") from None
        raise ModelRefused(shown(path), first_line(exc)) from None
    return out


def opset_for(dtypes: set[ir.DataType]) -> int:
    """The lowest default-domain opset whose DequantizeLinear takes all of `dtypes` per axis."""
    return max((_OPSET_FOR_TYPE[d] for d in dtypes), default=1)


def load_model(path: Path, check: bool = True,
               onnxruntime_check: Callable[[Path, int], bool] | None = None) -> ir.Model:
    """Load a float model; raise PtqError naming the file when it is not a usable ONNX model.

    With `check`, the model is validated before anything else reads it: every tensor's data
    must lie in the model's directory and be as long as its shape needs, and the graph must
    pass onnx's full check (known ops, a graph without cycles, consistent types), so a model
    onnxruntime would refuse never yields an output that looks like success.
    `onnxruntime_check(path, bytes with data files)` stands in for the plain onnxruntime load
    of that check where loading the model in onnxruntime does useful work too (PostTraining's
    simplification): it runs first, and onnx's checker only when it returns False.
    """
    where = shown(path)
    try:
        size = regular_file_size(path)
    except OSError as exc:
        raise PtqError(f"{where}: cannot read: {os_reason(exc)}") from None
    if size > MAX_PROTO_BYTES:
        raise PtqError(f"{where} is {size} bytes, above protobuf's 2 GB limit for one message; "
                       "store the weights as external data")
    proto = _parse(path)
    # Protobuf parses many non-ONNX byte strings without complaint; demand the basics.
    if proto.ir_version <= 0 or not proto.opset_import or not proto.graph.node:
        raise PtqError(f"{where}: not an ONNX model (no IR version, opset or graph nodes)")
    if proto.ir_version > onnx.IR_VERSION:
        raise PtqError(f"{where}: IR version {proto.ir_version} is newer than onnx "
                       f"{onnx.__version__} and onnxruntime know (max {onnx.IR_VERSION})")
    opset = _default_opset(proto)
    if opset > MAX_ORT_OPSET:
        raise PtqError(
            f"{where}: opset {opset} is newer than onnxruntime can run (max {MAX_ORT_OPSET})"
        )
    if check:
        external, data_bytes = check_external_data(proto, path)
        loads = onnxruntime_check or (lambda p, _: _onnxruntime_loads(p))
        # onnx's checker is stricter than onnxruntime in places (a graph input of unknown
        # rank, for one); onnxruntime, where the output will run, has the last word: a
        # model passes when either accepts it.
        if size > IN_MEMORY_BYTES and is_utf8(path):
            # A big model is offered to onnxruntime first, with this parse freed: onnx's
            # checker holds the file's bytes and its message at once (BERT-base: 686 MB,
            # onnxruntime without packed weights 388 MB; docs/decisions.md). Parsing it
            # again afterwards costs less.
            del proto
            release_memory()
            reason = None if loads(path, size + data_bytes) else _checker_failure(
                None, path, external)
            proto = _parse(path)
        elif onnxruntime_check is not None:
            # Its verdict makes the checker's redundant (docs/decisions.md, start-up cost).
            reason = None if loads(path, size + data_bytes) else _checker_failure(
                proto, path, external)
        else:
            reason = _checker_failure(proto, path, external)
            if reason is not None and _onnxruntime_loads(path):
                reason = None
        if reason is not None:
            raise PtqError(f"{where}: not a valid ONNX model: {reason}")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise PtqError(f"{where}: malformed ONNX graph: {exc}") from None
    del proto
    ir.external_data.set_base_dir(model.graph, path.parent)
    # Exported models hold weights both as initializers and as Constant nodes; passes only
    # need to look at initializers. Initializers listed as graph inputs are weights too.
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    common_passes.RemoveInitializersFromInputsPass()(model)
    # IR 3 lists every initializer as an input: without them listed, the model is IR 4's
    # (onnx's version converter misses initializers of an IR 3 model that are not inputs).
    model.ir_version = max(model.ir_version, 4)
    return model


def _parse(path: Path) -> onnx.ModelProto:
    """The model file's protobuf, its external data left on disk (onnx-ir maps it lazily,
    so any size loads). A big file is parsed a field at a time (`piecewise_parse`): read
    whole, it peaks at twice its size."""
    if regular_file_size(path) > IN_MEMORY_BYTES:
        with contextlib.suppress(Exception):  # onnx.load below names what is wrong
            return piecewise_parse.parse_model(str(path))
    try:
        return onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise PtqError(f"{shown(path)}: cannot read: {os_reason(exc)}") from None
    except Exception:
        # onnx wraps protobuf's DecodeError in its own class depending on the version.
        raise PtqError(f"{shown(path)}: not an ONNX model (protobuf cannot parse it)"
                       ) from None


def _checker_failure(proto: onnx.ModelProto | None, path: Path, external: int
                     ) -> str | None:
    """The first line of onnx's full check of the model (known ops, a graph without cycles,
    consistent types, tensors as long as their shapes), None when it passes."""
    try:
        # By path: the C++ checker reads the file itself (no copy of the proto through
        # Python) and knows the directory external data lives in. It takes only UTF-8
        # paths; a model with external data and another name is left to onnxruntime.
        if is_utf8(path):
            onnx.checker.check_model(str(path), full_check=True)
        elif not external:
            onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def _onnxruntime_loads(path: Path) -> bool:
    try:
        Session(path, level="disable", label=shown(path), prepack=False)
    except PtqError:
        return False
    return True


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of `graph` and its subgraphs: initializers, sparse ones, attributes."""
    for each in _graphs(graph):
        yield from each.initializer
        for sparse in each.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in each.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's shape and type need, or None for types of no fixed size."""
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except Exception:
        return None
    if dtype.kind in "OUS":
        return None
    elements = math.prod(tensor.dims)
    width = _SUB_BYTE_BITS.get(tensor.data_type)
    if width is not None:
        return (elements * width + 7) // 8
    return elements * dtype.itemsize


_SUB_BYTE_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(onnx.TensorProto, name)
}


def check_external_data(proto: onnx.ModelProto, path: Path) -> tuple[int, int]:
    """Every tensor stored outside the model file must lie in the model's directory (a
    location with `..`, an absolute one or a symbolic link leading out is refused: a model
    must not make ptqconv copy other files into its output) and be as long as its shape
    needs. Raise PtqError naming the tensor, the location and the model; return the number
    of tensors stored outside and the bytes of the files that hold them."""
    base = path.parent
    real_base = os.path.realpath(base)
    sizes: dict[str, int] = {}
    count = 0
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        count += 1
        entries = {e.key: e.value for e in tensor.external_data}
        where = f"{shown(path)}: tensor {tensor.name!r}"
        location = entries.get("location", "")
        if not location or "\0" in location:
            raise PtqError(f"{where} is stored externally but names no file "
                           f"(location {shown(location)})")
        parts = Path(location).parts
        real = os.path.realpath(base / location)
        if (os.path.isabs(location) or ".." in parts
                or os.path.commonpath([real, real_base]) != real_base):
            raise PtqError(f"{where} has its data outside the model's directory (location "
                           f"{shown(location)}); refused")
        if real not in sizes:
            try:
                sizes[real] = regular_file_size(base / location)
            except OSError as exc:
                raise PtqError(f"{where}: external data file {shown(base / location)}: "
                               f"{os_reason(exc)}") from None
        try:
            offset = int(entries.get("offset", "0"))
            needed = _tensor_bytes(tensor)
            length = int(entries["length"]) if "length" in entries else needed
        except ValueError:
            raise PtqError(f"{where}: external data offset or length is not an integer"
                           ) from None
        if length is None:
            length = sizes[real] - offset
        if needed is not None and length != needed:
            raise PtqError(f"{where}: external data length {length} bytes, but its shape "
                           f"{list(tensor.dims)} needs {needed}")
        if offset < 0 or offset + length > sizes[real]:
            raise PtqError(f"{where}: truncated data: {shown(base / location)} is "
                           f"{sizes[real]} bytes, the tensor's {length} bytes start at offset "
                           f"{offset}")
    return count, sum(sizes.values())


def _default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def ensure_opset(model: ir.Model, needed: int, base_dir: Path) -> ir.Model:
    """Return `model` at default-domain opset >= `needed`, converting the graph if it is lower.

    The version converter copies the whole model twice; it runs on a weightless copy (large
    tensors swapped for external-data placeholders) and the original tensors are put back.
    """
    current = model.opset_imports.get("", 1)
    if current >= needed:
        return model
    detached: dict[str, ir.TensorProtocol] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and tensor.nbytes > 1024:
            detached[name] = tensor
            value.const_value = ir.ExternalTensor(
                _PLACEHOLDER, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for name, tensor in detached.items():
            model.graph.initializers[name].const_value = tensor
    try:
        converted = onnx.version_converter.convert_version(proto, needed)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PtqError(
            f"cannot upgrade the model from opset {current} to {needed}, which the chosen "
            f"integer types need: {message}"
        ) from None
    if current < RESIZE_HALF_PIXEL_OPSET <= needed:
        _keep_asymmetric_resizes(converted.graph)
    upgraded = ir.serde.deserialize_model(converted)
    for name, tensor in detached.items():
        value = upgraded.graph.initializers.get(name)
        if value is None:
            raise PtqError(f"upgrading to opset {needed} dropped the weight {name!r}")
        value.const_value = tensor
    ir.external_data.set_base_dir(upgraded.graph, base_dir)
    upgraded.ir_version = max(upgraded.ir_version, _min_ir_version(needed))
    return upgraded


# Resize's default coordinate transformation from opset 11: half_pixel. Upsample and Resize-10
# sample asymmetrically (onnxruntime: nearest rounds down), and onnx's version converter
# leaves the attributes out, so an upgraded bilinear upsample moved a detector's outputs
# (output cosine 0.958-0.986 against the model as given, in float).
RESIZE_HALF_PIXEL_OPSET = 11


def _keep_asymmetric_resizes(graph: onnx.GraphProto) -> None:
    """Give every Resize the converter made from an opset 7-10 Upsample or Resize the
    sampling it had: asymmetric coordinates, nearest rounding down."""
    for g in _graphs(graph):
        for node in g.node:
            if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
                continue
            names = {a.name for a in node.attribute}
            if "coordinate_transformation_mode" not in names:
                node.attribute.append(onnx.helper.make_attribute(
                    "coordinate_transformation_mode", "asymmetric"))
            if "nearest_mode" not in names:
                node.attribute.append(onnx.helper.make_attribute("nearest_mode", "floor"))


def _min_ir_version(opset: int) -> int:
    version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    return min(version, MAX_ORT_IR_VERSION)


def tensor_bytes(model: ir.Model) -> int:
    """Bytes the model's initializers take when serialized."""
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


def float16_constants(model: ir.Model) -> frozenset[str]:
    """The names of the model's float16 constants (initializers and Constant nodes, in every
    graph) when they outweigh its float32 ones: a float16 model, whose output should keep
    them float16 where they stay float (empty otherwise). Float32 constants of a mixed
    model are not named: kept float32 on purpose, perhaps (a LayerNormalization's)."""
    found: dict[ir.DataType, dict[str, int]] = {ir.DataType.FLOAT16: {}, ir.DataType.FLOAT: {}}

    def count(name: str | None, tensor: ir.TensorProtocol | None) -> None:
        if tensor is not None and tensor.dtype in found and name:
            found[tensor.dtype][name] = tensor.nbytes

    for graph in (model.graph, *model.graph.subgraphs()):
        for name, value in graph.initializers.items():
            count(name, value.const_value)
        for node in graph:
            if node.op_type == "Constant" and (attr := node.attributes.get("value")) is not None:
                count(node.outputs[0].name, attr.as_tensor())
    half, full = found[ir.DataType.FLOAT16], found[ir.DataType.FLOAT]
    return frozenset(half) if sum(half.values()) > sum(full.values()) else frozenset()


def model_files(path: Path, model: ir.Model) -> list[Path]:
    """The model file and the external data files its tensors live in."""
    data = {
        Path(t.base_dir) / t.location
        for t in (v.const_value for v in model.graph.initializers.values())
        if isinstance(t, ir.ExternalTensor)
    }
    return [path, *sorted(data)]


def model_size(path: str | os.PathLike) -> int:
    """Bytes on disk of the model file plus the external data files its tensors use."""
    path = Path(path)
    proto = _parse(path)  # a big file piecewise: only the locations of data are wanted
    total = path.stat().st_size
    for location in sorted(_external_locations(proto.graph)):
        data = path.parent / location
        try:
            total += data.stat().st_size
        except OSError as exc:
            raise PtqError(
                f"{path}: external data file {data}: {exc.strerror or exc}"
            ) from None
    return total


def _external_locations(graph: onnx.GraphProto) -> set[str]:
    tensors: list[onnx.TensorProto] = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        tensors += [sparse.values, sparse.indices]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
    locations = set()
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                locations |= _external_locations(attr.g)
            for sub in attr.graphs:
                locations |= _external_locations(sub)
    return locations


def files_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


_STAGED_MODEL = "model.onnx"
_STAGED_DATA = "model.onnx.data"


@dataclass(frozen=True)
class SavedModel:
    """A model written into a staging area: its file there and every file written."""

    path: Path
    files: list[Path]


def save_model(model: ir.Model, path: Path, staging: Staging) -> SavedModel:
    """Write `model` for `path` into `staging`, which moves it into place when committed;
    weights go to `<name>.data` beside it above the 2 GB limit.

    Otherwise every tensor is written into the model file: a model whose weights still point
    into the input's external data (or a temporary directory) would not load anywhere else.
    """
    external = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data = path.with_name(path.name + ".data")
    if not external:
        internalize(model)
    # Staged under short names: onnx-ir writes the data through a temporary file whose name
    # adds a dozen characters to the data file's, too many beside a 250-character name. The
    # data file goes first, so it is moved into place before the model that needs it.
    staged_data = staging.path(data) if external else None
    tmp = staging.path(path, _STAGED_MODEL)
    try:
        if staged_data is None:
            ir.save(model, tmp)
            return SavedModel(tmp, [tmp])
        ir.save(model, tmp, external_data=_STAGED_DATA, size_threshold_bytes=1024)
        # The data file name is recorded inside the model, so it must be the final one.
        proto = onnx.load(str(tmp), load_external_data=False)
        for tensor in _all_tensors(proto.graph):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value == _STAGED_DATA:
                    entry.value = data.name
        onnx.save(proto, str(tmp))
        os.replace(tmp.with_name(_STAGED_DATA), staged_data)
    except OSError as exc:
        raise PtqError(f"--outputFile: cannot write {shown(path)}: {os_reason(exc)}") from None
    return SavedModel(tmp, [tmp, staged_data])


def unmap_weights(model: ir.Model) -> None:
    """Close the memory maps of `model`'s weights read from external data: the pages read stop
    counting against the process (BERT-base: 0.34 GB), and a weight read again is mapped
    again. A weight whose array is still referenced elsewhere stays mapped."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            release_mapping(value.const_value)


def internalize(model: ir.Model) -> None:
    """Read every tensor stored in an external file into memory, attributes included."""
    ir.external_data.load_to_model(model)
    for graph in model.graphs():
        for node in graph:
            for name, attr in list(node.attributes.items()):
                if isinstance(attr.value, ir.ExternalTensor):
                    node.attributes[name] = ir.AttrTensor(name, ir.Tensor(attr.value.numpy()))


def lean_rewrite(saved: SavedModel, source: Path) -> SavedModel | None:
    """The staged single-file float rewrite `saved` rewritten in its leanest form: without
    the types and shapes of intermediate values (onnxruntime infers them again at load),
    without initializers nothing reads, and without the names of nodes the rewrite made
    (the names of `source`'s nodes stay). None for a model with external data."""
    if len(saved.files) != 1:
        return None
    given = {n.name for n in _graphs(onnx.load(str(source), load_external_data=False).graph)
             for n in n.node}
    proto = onnx.load(str(saved.path))
    for graph in _graphs(proto.graph):
        del graph.value_info[:]
        for node in graph.node:
            if node.name not in given:
                node.ClearField("name")
    used = {name for graph in _graphs(proto.graph) for node in graph.node
            for name in node.input} | {v.name for v in proto.graph.output}
    kept = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    try:
        onnx.save(proto, str(saved.path))
    except OSError as exc:
        raise PtqError(f"--outputFile: cannot write {shown(saved.path)}: "
                       f"{os_reason(exc)}") from None
    return SavedModel(saved.path, [saved.path])


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """`graph` and every subgraph under it."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else []
            for sub in [*subgraphs, *attr.graphs]:
                found += _graphs(sub)
    return found


def copy_model(source: Path, path: Path, staging: Staging) -> SavedModel:
    """Stage a copy of the single-file model `source` for `path` (see save_model)."""
    tmp = staging.path(path, _STAGED_MODEL)
    try:
        shutil.copyfile(source, tmp)
    except OSError as exc:
        raise PtqError(f"--outputFile: cannot write {shown(path)}: {os_reason(exc)}") from None
    return SavedModel(tmp, [tmp])
