"""AIMET / QNN encodings files: every quantized tensor's scale, offset, bit width and symmetry
as JSON, read in the versions AIMET and QAIRT write and written as 0.6.1 (docs/reference.md
§5).

Reading gives `FileEncoding`s in the files' own unsigned view (real = (q + offset) * scale);
`qparams` turns them into ONNX grids once it is known whether the tensor is an activation
(uint8) or a weight (int8). Writing takes the grids the QDQ pass made, so the file matches the
model bit for bit: a float32 scale is written as the exact decimal of its float64 value and
reads back to the same float32.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptqconv import qparams
from ptqconv.errors import PtqUsageError, shown

VERSION = "0.6.1"  # written: the widest read (AIMET 1.x, QAIRT's converters)
READ = ("0.4.0", "0.5.0", "0.6.1", "1.0.0", "2.0.0")
# Where ptqconv records, inside `quantizer_args`, the choices a file's grids were made with.
CHOICES_KEY = "ptqconv"
_UNSIGNED = {"uint4": 4, "uint8": 8, "uint16": 16}
_SIGNED = {"int4": 4, "int8": 8, "int16": 16, "int32": 32}


@dataclass(frozen=True)
class FileEncoding:
    """One tensor of an encodings file, in its unsigned view. `scale` and `offset` hold one
    value per channel (one for a per-tensor encoding); `axis` is the ONNX channel axis where
    the file records it (2.0.0 only)."""

    bits: int
    symmetric: bool
    scale: np.ndarray  # float32
    offset: np.ndarray  # int64
    per_channel: bool
    axis: int | None = None
    is_float: bool = False  # the tensor is to stay float


@dataclass
class EncodingsFile:
    """What an encodings file says, by tensor name."""

    path: Path
    version: str
    tensors: dict[str, FileEncoding]
    excluded_layers: list[str] = field(default_factory=list)
    choices: dict[str, Any] | None = None  # ptqconv's, when ptqconv wrote the file


def read(path: Path) -> EncodingsFile:
    """The encodings in `path`; PtqUsageError naming the file and the entry when it is not
    an encodings file ptqconv can use."""
    where = shown(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise PtqUsageError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PtqUsageError(f"{where}: not a JSON encodings file: {exc}") from None
    if not isinstance(doc, dict):
        raise PtqUsageError(f"{where}: not an encodings file: the top level is not an object")
    version = str(doc.get("version", "0.4.0"))  # AIMET wrote no version before 0.5.0
    if version not in READ:
        raise PtqUsageError(f"{where}: encodings version {version!r} is not supported; "
                            f"allowed: {', '.join(READ)}")
    found: list[tuple[str, Any, Any]] = []  # (name, entry, parser)
    try:
        if version == "2.0.0":
            found = [(str(e.get("name")), e, _onnx_entry) for e in _list(doc, "encodings")]
        else:
            for section in ("activation_encodings", "param_encodings"):
                if version.startswith("0."):
                    given = _mapping(doc.get(section, {}), section)
                    found += [(str(n), e, _legacy_entry) for n, e in given.items()]
                else:
                    found += [(str(e.get("name")), e, _aimet1_entry)
                              for e in _list(doc, section)]
    except _Bad as exc:
        raise PtqUsageError(f"{where}: {exc}") from None
    tensors: dict[str, FileEncoding] = {}
    for name, entry, parse in found:
        try:
            encoding = parse(entry)
            if not np.all(np.isfinite(encoding.scale) & (encoding.scale > 0)):
                raise _Bad("a scale is not a positive number")
        except _Bad as exc:
            raise PtqUsageError(f"{where}: tensor {name!r}: {exc}") from None
        except KeyError as exc:
            raise PtqUsageError(
                f"{where}: tensor {name!r}: the encoding has no {exc.args[0]!r}; AIMET 0.6.1 "
                "entries need bitwidth and scale + offset (or min + max), 1.0.0 ones bw, "
                "scale and offset") from None
        except (TypeError, ValueError, IndexError, AttributeError) as exc:
            raise PtqUsageError(f"{where}: tensor {name!r}: malformed encoding ({exc})"
                                ) from None
        tensors[name] = encoding
    args = doc.get("quantizer_args")
    choices = args.get(CHOICES_KEY) if isinstance(args, dict) else None
    excluded = doc.get("excluded_layers", [])
    return EncodingsFile(path, version, tensors,
                         [str(n) for n in excluded] if isinstance(excluded, list) else [],
                         choices if isinstance(choices, dict) else None)


class _Bad(ValueError):
    pass


def _list(doc: Mapping, key: str) -> list[dict]:
    found = doc.get(key, [])
    if not isinstance(found, list) or not all(isinstance(e, dict) for e in found):
        raise _Bad(f"'{key}' is not a list of encodings")
    return found


def _mapping(found: Any, key: str) -> dict:
    if not isinstance(found, dict):
        raise _Bad(f"'{key}' is not a mapping of tensor names to encodings")
    return found


def _flag(value: Any, key: str) -> bool:
    # 0.x writes "True"/"False"; 1.0.0 a bool, though some Qualcomm tools write the string.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _Bad(f"{key} must be true or false, got {value!r}")


def _bits(value: Any) -> int:
    bits = int(value)
    if not 1 <= bits <= 32:
        raise _Bad(f"bit width {value!r} is out of range; allowed: [1, 32]")
    return bits


def _legacy_entry(entries: Any) -> FileEncoding:
    """0.4.0 / 0.5.0 / 0.6.1: a list with one dict per channel (one for per tensor)."""
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        raise _Bad("an encoding is not a list of per-channel entries")
    if any(str(e.get("dtype", "int")).lower() == "float" for e in entries):
        return FileEncoding(32, False, np.ones(1, np.float32), np.zeros(1, np.int64), False,
                            is_float=True)
    bits = _bits(entries[0]["bitwidth"])
    symmetric = _flag(entries[0].get("is_symmetric", "False"), "is_symmetric")
    if all("scale" in e and "offset" in e for e in entries):
        scale = np.array([float(e["scale"]) for e in entries], np.float64).astype(np.float32)
        offset = np.array([round(float(e["offset"])) for e in entries], np.int64)
    else:  # min / max only (ranges learned in training): the grid AIMET would make
        low = np.array([float(e["min"]) for e in entries])
        high = np.array([float(e["max"]) for e in entries])
        scale, offset = qparams.range_encoding(low, high, bits, symmetric)
    return FileEncoding(bits, symmetric, scale, offset, len(entries) > 1)


def _aimet1_entry(entry: dict) -> FileEncoding:
    """1.0.0: {"name", "dtype", "enc_type", "bw", "is_sym", "scale": [..], "offset": [..]}."""
    if str(entry.get("dtype", "INT")).upper() == "FLOAT":
        return FileEncoding(32, False, np.ones(1, np.float32), np.zeros(1, np.int64), False,
                            is_float=True)
    kind = str(entry.get("enc_type", "PER_TENSOR")).upper()
    if kind not in ("PER_TENSOR", "PER_CHANNEL"):
        raise _Bad(f"enc_type {kind} is not supported; allowed: PER_TENSOR, PER_CHANNEL")
    scale = np.array([float(s) for s in entry["scale"]], np.float64).astype(np.float32)
    offset = np.array([round(float(o)) for o in entry["offset"]], np.int64)
    if scale.shape != offset.shape or not scale.size:
        raise _Bad("scale and offset differ in length")
    return FileEncoding(_bits(entry["bw"]), _flag(entry.get("is_sym", False), "is_sym"),
                        scale, offset, kind == "PER_CHANNEL")


def _onnx_entry(entry: dict) -> FileEncoding:
    """2.0.0: ONNX's own {"name", "output_dtype", "y_scale", "y_zero_point", "axis"}."""
    dtype = str(entry["output_dtype"]).lower()
    if "block_size" in entry:
        raise _Bad("block-wise encodings are not supported")
    if dtype not in _UNSIGNED and dtype not in _SIGNED:
        raise _Bad(f"output_dtype {dtype!r} is not supported; allowed: "
                   f"{', '.join([*_UNSIGNED, *_SIGNED])}")
    scale = np.atleast_1d(np.asarray(entry["y_scale"], np.float64)).astype(np.float32)
    zero_point = np.broadcast_to(np.atleast_1d(np.asarray(entry.get("y_zero_point", 0),
                                                          np.int64)), scale.shape)
    signed = dtype in _SIGNED
    bits = _SIGNED[dtype] if signed else _UNSIGNED[dtype]
    offset = -(zero_point + (1 << (bits - 1))) if signed else -zero_point
    per_channel = np.ndim(entry["y_scale"]) == 1
    return FileEncoding(bits, signed and not np.any(zero_point), scale, offset.astype(np.int64),
                        per_channel, entry.get("axis") if per_channel else None)


def document(activations: Mapping[str, qparams.Encoding],
             params: Mapping[str, qparams.Encoding], excluded_layers: list[str],
             quantizer_args: Mapping[str, Any]) -> dict[str, Any]:
    """A 0.6.1 encodings document (see the module docstring)."""
    return {"version": VERSION,
            "activation_encodings": {n: _entries(e) for n, e in activations.items()},
            "param_encodings": {n: _entries(e) for n, e in params.items()},
            "excluded_layers": list(excluded_layers),
            "quantizer_args": dict(quantizer_args)}


def _entries(encoding: qparams.Encoding) -> list[dict[str, Any]]:
    scale = np.atleast_1d(encoding.scale)
    offset = np.atleast_1d(qparams.offsets(encoding))
    bits = qparams.used_bits(encoding.grid)
    low, high = qparams.encoded_range(scale, offset, bits)
    return [{"bitwidth": bits, "dtype": "int",
             "is_symmetric": str(encoding.grid.symmetric), "max": float(hi),
             "min": float(lo), "offset": int(o), "scale": float(s)}
            for s, o, lo, hi in zip(scale, offset, low, high, strict=True)]


def write(path: Path, doc: Mapping[str, Any]) -> None:
    """Write `doc` to `path` atomically (a temporary file beside it, renamed)."""
    text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise

