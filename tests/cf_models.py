"""Recurrent models whose work lives in If / Loop / Scan bodies, built with onnx.helper.

The cell is GRU-like (names are the body tensors', shared with `reference_cell`):
    mm_x{g} = x Wx{g}   mm_h{g} = h Wh{g}       g in z, r, n
    z = Sigmoid(mm_xz + mm_hz)   r = Sigmoid(mm_xr + mm_hr)
    n = Tanh(mm_xn + r * mm_hn)  h_new = n + z * (h - n)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GATES = ("z", "r", "n")


def weights(inputs: int, hidden: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    found = {}
    for g in GATES:
        found[f"Wx{g}"] = (rng.standard_normal((inputs, hidden)) / np.sqrt(inputs)).astype(
            np.float32)
        found[f"Wh{g}"] = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(
            np.float32)
    return found


def cell_nodes(x: str, h: str, out: str, prefix: str = "") -> list[onnx.NodeProto]:
    """The cell's nodes reading `x` and `h`, writing `out`; weights named Wx{g} / Wh{g}."""
    nodes = []

    def node(op: str, inputs: list[str], output: str) -> str:
        nodes.append(helper.make_node(op, inputs, [prefix + output], name=prefix + output))
        return prefix + output

    mm = {f"{s}{g}": node("MatMul", [src, f"W{s}{g}"], f"mm_{s}{g}")
          for s, src in (("x", x), ("h", h)) for g in GATES}
    z = node("Sigmoid", [node("Add", [mm["xz"], mm["hz"]], "pre_z")], "z")
    r = node("Sigmoid", [node("Add", [mm["xr"], mm["hr"]], "pre_r")], "r")
    rh = node("Mul", [r, mm["hn"]], "rh")
    n = node("Tanh", [node("Add", [mm["xn"], rh], "pre_n")], "n")
    d = node("Sub", [h, n], "d")
    nodes.append(helper.make_node("Add", [n, node("Mul", [z, d], "zd")], [out],
                                  name=prefix + "h_new"))
    return nodes


def reference_cell(x: np.ndarray, h: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    z = sigmoid(x @ w["Wxz"] + h @ w["Whz"])
    r = sigmoid(x @ w["Wxr"] + h @ w["Whr"])
    n = np.tanh(x @ w["Wxn"] + r * (h @ w["Whn"]))
    return (n + z * (h - n)).astype(np.float32)


def _info(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _inits(w: dict[str, np.ndarray]) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(v, k) for k, v in w.items()]


def loop_model(hidden: int, steps_input: bool = True, seed: int = 0) -> onnx.ModelProto:
    """X [T, 1, hidden] -> Loop over T running the cell on state h (h0 in) -> h_T, Y [T, ...]."""
    w = weights(hidden, hidden, seed)
    body = helper.make_graph(
        [helper.make_node("Gather", ["X", "i"], ["x_t"], axis=0),
         *cell_nodes("x_t", "h_in", "h_next"),
         helper.make_node("Identity", ["c_in"], ["c_out"]),
         helper.make_node("Identity", ["h_next"], ["y_t"])],
        "body", [_info("i", [], TensorProto.INT64), _info("c_in", [], TensorProto.BOOL),
                 _info("h_in", [1, hidden])],
        [_info("c_out", [], TensorProto.BOOL), _info("h_next", [1, hidden]),
         _info("y_t", [1, hidden])])
    nodes = [helper.make_node("Shape", ["X"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["T"], axis=0),
             helper.make_node("Loop", ["T", "", "h0"], ["h_T", "Y"], name="time_loop",
                              body=body)]
    inits = [*_inits(w), numpy_helper.from_array(np.array(0, np.int64), "zero")]
    return _model(nodes, [_info("X", ["T", 1, hidden]), _info("h0", [1, hidden])],
                  [_info("h_T", [1, hidden]), _info("Y", ["T", 1, hidden])], inits)


def scan_model(hidden: int, seed: int = 0) -> onnx.ModelProto:
    """The Loop model's recurrence as a Scan over X's first axis."""
    w = weights(hidden, hidden, seed)
    body = helper.make_graph(
        [*cell_nodes("x_t", "h_in", "h_next"),
         helper.make_node("Identity", ["h_next"], ["y_t"])],
        "body", [_info("h_in", [1, hidden]), _info("x_t", [1, hidden])],
        [_info("h_next", [1, hidden]), _info("y_t", [1, hidden])])
    nodes = [helper.make_node("Scan", ["h0", "X"], ["h_T", "Y"], name="time_scan", body=body,
                              num_scan_inputs=1)]
    return _model(nodes, [_info("X", ["T", 1, hidden]), _info("h0", [1, hidden])],
                  [_info("h_T", [1, hidden]), _info("Y", ["T", 1, hidden])], _inits(w))


def streaming_model(hidden: int = 256, channels: int = 64, length: int = 16,
                    seed: int = 0) -> onnx.ModelProto:
    """One step of a streaming model: when `active`, a frame x [1, channels, length] goes
    through a Conv1d (hidden channels) -> Relu -> GlobalAveragePool into the cell updating
    the state h; otherwise h decays. A MatMul reads the new state out (logits)."""
    rng = np.random.default_rng(seed + 1)
    w = weights(hidden, hidden, seed)
    conv = (rng.standard_normal((hidden, channels, 3)) / np.sqrt(3 * channels)).astype(
        np.float32)
    conv_b = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    head = (rng.standard_normal((hidden, 16)) / np.sqrt(hidden)).astype(np.float32)
    then = helper.make_graph(
        [helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], name="conv", pads=[1, 1]),
         helper.make_node("Relu", ["c"], ["c_relu"], name="relu"),
         helper.make_node("GlobalAveragePool", ["c_relu"], ["pooled"], name="pool"),
         helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"),
         *cell_nodes("features", "h", "h_active")],
        "active", [], [_info("h_active", [1, hidden])])
    otherwise = helper.make_graph(
        [helper.make_node("Mul", ["h", "decay"], ["h_idle"], name="decay")],
        "idle", [], [_info("h_idle", [1, hidden])])
    nodes = [helper.make_node("If", ["active"], ["h_out"], name="step", then_branch=then,
                              else_branch=otherwise),
             helper.make_node("MatMul", ["h_out", "Wy"], ["logits"], name="head")]
    inits = [*_inits(w), numpy_helper.from_array(conv, "Wc"),
             numpy_helper.from_array(conv_b, "bc"), numpy_helper.from_array(head, "Wy"),
             numpy_helper.from_array(np.array(0.9, np.float32), "decay")]
    return _model(nodes, [_info("x", [1, channels, length]), _info("h", [1, hidden]),
                          _info("active", [], TensorProto.BOOL)],
                  [_info("h_out", [1, hidden]), _info("logits", [1, 16])], inits)


def stream(model_path, steps: int, channels: int = 64, length: int = 16, hidden: int = 256,
           seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Inputs of `steps` consecutive steps of the streaming model run in float from h = 0:
    each step's state is the previous step's output, so the samples hold real states."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    h = np.zeros((1, hidden), np.float32)
    found = []
    for t in range(steps):
        feeds = {"x": rng.standard_normal((1, channels, length)).astype(np.float32),
                 "h": h, "active": np.array(t % 4 != 3)}
        found.append(feeds)
        h = session.run(["h_out"], feeds)[0]
    return found


def loop_with_if_model(hidden: int, seed: int = 0) -> onnx.ModelProto:
    """A Loop over X [T, 1, hidden] whose body runs the cell in an If only on the steps whose
    C[t] is true, and keeps h otherwise."""
    w = weights(hidden, hidden, seed)
    then = helper.make_graph(cell_nodes("x_t", "h_in", "h_cell"), "update", [],
                             [_info("h_cell", [1, hidden])])
    keep = helper.make_graph([helper.make_node("Identity", ["h_in"], ["h_kept"])], "keep", [],
                             [_info("h_kept", [1, hidden])])
    body = helper.make_graph(
        [helper.make_node("Gather", ["X", "i"], ["x_t"], axis=0),
         helper.make_node("Gather", ["C", "i"], ["c_t"], axis=0),
         helper.make_node("If", ["c_t"], ["h_next"], name="gate", then_branch=then,
                          else_branch=keep),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [_info("i", [], TensorProto.INT64), _info("c_in", [], TensorProto.BOOL),
                 _info("h_in", [1, hidden])],
        [_info("c_out", [], TensorProto.BOOL), _info("h_next", [1, hidden])])
    nodes = [helper.make_node("Shape", ["X"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["T"], axis=0),
             helper.make_node("Loop", ["T", "", "h0"], ["h_T"], name="time_loop", body=body)]
    inits = [*_inits(w), numpy_helper.from_array(np.array(0, np.int64), "zero")]
    return _model(nodes, [_info("X", ["T", 1, hidden]), _info("C", ["T"], TensorProto.BOOL),
                          _info("h0", [1, hidden])], [_info("h_T", [1, hidden])], inits)
