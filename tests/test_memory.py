"""Memory a conversion gives back: mapped weights unmapped and read again on demand."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from models import mlp, save

from ptqconv import modelio


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
