"""Load and save ONNX models through onnx-ir: validation, opset upgrades, atomic writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx.helper
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ptqconv.errors import PtqError

# docs/reference.md §3: onnxruntime 1.31 refuses models above opset 26 and IR version 13.
MAX_ORT_OPSET = 26
MAX_ORT_IR_VERSION = 13
# Protobuf refuses messages of 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

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


def simplify_with_onnxruntime(path: Path, workdir: Path) -> Path:
    """The float model after onnxruntime's basic (hardware-independent) graph optimizations.

    They fold BatchNormalization and constant Mul/Add into Conv and fold constants, as
    onnxruntime's quant_pre_process does; quantizing a conv output before a per-channel
    rescale amplifies the noise of small channels. The result has only standard ONNX ops.
    """
    import onnxruntime as ort

    out = workdir / "simplified.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", "simplified.onnx.data")
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1073741824")
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PtqError(f"{path}: onnxruntime cannot load the model: {message}") from None
    return out


def opset_for(dtypes: set[ir.DataType]) -> int:
    """The lowest default-domain opset whose DequantizeLinear takes all of `dtypes` per axis."""
    return max((_OPSET_FOR_TYPE[d] for d in dtypes), default=1)


def load_model(path: Path) -> ir.Model:
    """Load a float model; raise PtqError naming the file when it is not a usable ONNX model."""
    try:
        # External data stays on disk (onnx-ir maps it lazily), so any size loads.
        proto = onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise PtqError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except Exception:
        # onnx wraps protobuf's DecodeError in its own class depending on the version.
        raise PtqError(f"{path}: not an ONNX model (protobuf cannot parse it)") from None
    # Protobuf parses many non-ONNX byte strings without complaint; demand the basics.
    if proto.ir_version <= 0 or not proto.opset_import or not proto.graph.node:
        raise PtqError(f"{path}: not an ONNX model (no IR version, opset or graph nodes)")
    opset = _default_opset(proto)
    if opset > MAX_ORT_OPSET:
        raise PtqError(
            f"{path}: opset {opset} is newer than onnxruntime can run (max {MAX_ORT_OPSET})"
        )
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise PtqError(f"{path}: malformed ONNX graph: {exc}") from None
    del proto
    ir.external_data.set_base_dir(model.graph, path.parent)
    # Exported models hold weights both as initializers and as Constant nodes; passes only
    # need to look at initializers. Initializers listed as graph inputs are weights too.
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    common_passes.RemoveInitializersFromInputsPass()(model)
    return model


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
    upgraded = ir.serde.deserialize_model(converted)
    for name, tensor in detached.items():
        value = upgraded.graph.initializers.get(name)
        if value is None:
            raise PtqError(f"upgrading to opset {needed} dropped the weight {name!r}")
        value.const_value = tensor
    ir.external_data.set_base_dir(upgraded.graph, base_dir)
    upgraded.ir_version = max(upgraded.ir_version, _min_ir_version(needed))
    return upgraded


def _min_ir_version(opset: int) -> int:
    version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    return min(version, MAX_ORT_IR_VERSION)


def tensor_bytes(model: ir.Model) -> int:
    """Bytes the model's initializers take when serialized."""
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


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
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise PtqError(f"{path}: cannot read the model: {exc}") from None
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_model(model: ir.Model, path: Path) -> list[Path]:
    """Write `model` to `path` atomically; weights go to `<name>.data` above the 2 GB limit.

    The model is written to a temporary file beside `path` and renamed, so a failed or
    interrupted run never leaves a partial model behind. Returns the files written.
    """
    external = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if external:
            # The data file name is recorded inside the model, so it must be final already.
            ir.save(model, tmp, external_data=data_name, size_threshold_bytes=1024)
        else:
            ir.save(model, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if external:
            with contextlib.suppress(OSError):
                (path.parent / data_name).unlink()
        raise
    return [path, path.parent / data_name] if external else [path]


def copy_model(source: Path, path: Path) -> None:
    """Copy the single-file model `source` to `path` atomically (see save_model)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
