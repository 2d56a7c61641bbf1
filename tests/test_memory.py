"""Memory a conversion gives back: mapped weights unmapped and read again on demand."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
from models import mlp, save

from ptqconv import modelio, runtime
from ptqconv.graph.initializers import ScaledTensor, mapped, scale_constant


def test_unmapped_weights_read_back_equal_and_views_keep_their_map(tmp_path):
    src = save(mlp(), tmp_path / "float.onnx")
    model = ir.load(src)
    path = tmp_path / "ext.onnx"
    ir.save(model, path, external_data="ext.onnx.data", size_threshold_bytes=0)
    model = modelio.load_model(path)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors)
    first = [np.array(t.numpy()) for t in tensors]
    assert all(t.raw is not None for t in tensors)  # read: mapped
    held = tensors[0].numpy()  # a view of the map someone still uses
    modelio.unmap_weights(model)
    assert tensors[0].raw is not None  # its view keeps it mapped
    assert all(t.raw is None for t in tensors[1:])
    assert all(np.array_equal(t.numpy(), f) for t, f in zip(tensors, first, strict=True))
    assert np.array_equal(held, first[0])



def test_scaled_mapped_weights_hold_no_copy_and_read_as_the_eager_product(tmp_path):
    src = save(mlp(), tmp_path / "float.onnx")
    path = tmp_path / "ext.onnx"
    ir.save(ir.load(src), path, external_data="ext.onnx.data", size_threshold_bytes=0)
    model = modelio.load_model(path)
    weights = [v for v in model.graph.initializers.values() if len(v.const_value.shape) == 2]
    original = [np.array(v.const_value.numpy()) for v in weights]
    rng = np.random.default_rng(0)
    first = [rng.uniform(0.1, 4.0, (w.shape[0], 1)) for w in original]  # float64, like s
    second = [rng.uniform(0.1, 4.0, (1, w.shape[1])).astype(np.float32) for w in original]
    for value, a, b in zip(weights, first, second, strict=True):
        scale_constant(value, a)
        scale_constant(value, b)
    for value, w, a, b in zip(weights, original, first, second, strict=True):
        tensor = value.const_value
        assert isinstance(tensor, ScaledTensor)
        assert isinstance(mapped(tensor), ir.ExternalTensor)
        eager = np.asarray(np.asarray(w * a, np.float32) * b, np.float32)
        got = tensor.numpy()
        assert got.dtype == np.float32 and got.tobytes() == eager.tobytes()
    modelio.unmap_weights(model)  # reaches the maps under the scalings
    assert all(mapped(v.const_value).raw is None for v in weights)
    out = tmp_path / "scaled.onnx"
    ir.save(model, out)
    back = ir.load(out)
    for value, w, a, b in zip(weights, original, first, second, strict=True):
        eager = np.asarray(np.asarray(w * a, np.float32) * b, np.float32)
        assert np.array_equal(back.graph.initializers[value.name].const_value.numpy(), eager)


def test_scaled_in_memory_weights_are_replaced_at_once():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    value = ir.Value(name="w", const_value=ir.Tensor(w, name="w"))
    scale_constant(value, np.array([[2.0], [0.5]]))
    assert not isinstance(value.const_value, ScaledTensor)
    assert mapped(value.const_value) is None
    assert np.array_equal(value.const_value.numpy(), w * np.array([[2.0], [0.5]], np.float32))

_HEAP_PROBE = """
import re, sys
from ptqconv import runtime
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
if sys.argv[1] == "give_back":
    runtime.give_back_big_allocations()
big = runtime.MMAP_THRESHOLD + (4 << 20)
first = bytearray(big)  # freeing a mapped block raises glibc's own threshold past it
del first
before = rss()
second = bytearray(big)
del second
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_big_buffers_leave_the_resident_set_when_freed():
    """With glibc's default, a big buffer freed after another one stays resident in the heap;
    give_back_big_allocations maps it, so freeing it gives it back."""
    kept = {mode: int(subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode],
                                     capture_output=True, text=True, check=True).stdout)
            for mode in ("default", "give_back")}
    mb = (runtime.MMAP_THRESHOLD >> 20) + 4
    assert kept["give_back"] < 2 and kept["default"] >= mb - 2, kept
