"""The weight cores: layouts, GPTQ, second moments, weight correction, mixed bit."""

from __future__ import annotations

import tracemalloc
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ptqconv import qparams
from ptqconv.calibrate.moments import DenseMoment, Im2colMoment, output_size
from ptqconv.weights import gptq as gptq_module
from ptqconv.weights import layout as layouts
from ptqconv.weights.correction import corrected, correction_factors
from ptqconv.weights.gptq import conv_rows, gptq, row_errors
from ptqconv.weights.layout import WeightLayout
from ptqconv.weights.mixed_bit import relative_error, smallest_bits

FAST = settings(max_examples=40, deadline=None)


def grids():
    return st.one_of(
        st.integers(2, 8).map(qparams.weight_only_grid),
        st.tuples(st.integers(2, 8), st.booleans()).map(
            lambda t: qparams.fused_weight_grid(*t)))


def problem(seed: int, rows: int, cols: int, samples: int, correlated: bool = True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, cols)) * rng.uniform(0.1, 3.0, cols)
    if correlated:
        x = x @ (np.eye(cols) + 0.5 * rng.standard_normal((cols, cols)))
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.05, 2.0)).astype(np.float32)
    return w, x.T @ x


def per_row(w: np.ndarray, grid: qparams.Grid):
    rmin, rmax = qparams.tensor_range(w, 0)
    return qparams.scale_zero_point(rmin, rmax, grid)


def reference_gptq(w, h, grid, scale, zp, act_order=False):
    """Frantar et al. 2022, Algorithm 1 without lazy batching: the upper Cholesky factor of
    H^-1, column by column, the error spread along its rows."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    c = w.shape[1]
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(c)
    w, h = w[:, perm], h[perm][:, perm]
    h += 0.01 * np.mean(np.diag(h)) * np.eye(c)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros(w.shape, np.int32)
    for j in range(c):
        q[:, j] = qparams.quantize(w[:, j], scale, zp, grid)
        err = (w[:, j] - qparams.dequantize(q[:, j], scale, zp)) / hinv[j, j]
        w[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
    return q[:, np.argsort(perm)]


# --- GPTQ ------------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 12), cols=st.integers(1, 40),
       grid=grids(), act=st.booleans(), block=st.integers(1, 16))
def test_gptq_gives_the_reference_algorithms_integers(seed, rows, cols, grid, act, block):
    """The LDL-form sweep with lazy blocks is GPTQ (float64 work; a rounding tie may flip)."""
    w, h = problem(seed, rows, cols, 3 * cols + 5)
    s, z = per_row(w, grid)
    want = reference_gptq(w, h, grid, s, z, act_order=act)
    got = gptq(w[None], h[None], grid, s[:, None], z[:, None], act_order=act, guard=False,
               block=block, work_dtype=np.float64)
    assert np.mean(got.q[0] == want) >= 0.99


@FAST
@given(seed=st.integers(0, 10_000), cols=st.integers(1, 40), block=st.integers(1, 16),
       rows=st.integers(1, 8))
def test_blocked_cholesky_gives_numpys_factor_and_gptqs_integers(seed, cols, block, rows):
    """Large layers factor H in blocks (`gptq._upper_cholesky`, in place): the same unit upper
    factor as numpy's Cholesky to float64 rounding, and GPTQ's integers with it; a matrix
    that is not positive definite raises as numpy's does."""
    w, h = problem(seed, rows, cols, 3 * cols + 5)
    h = h + 0.01 * np.mean(np.diag(h)) * np.eye(cols)
    want = gptq_module._unit_upper(h[None], np.float64)
    with mock.patch.object(gptq_module, "BLOCKED_CHOLESKY", 1), \
            mock.patch.object(gptq_module, "CHOLESKY_BLOCK", block):
        got = gptq_module._unit_upper(h[None].copy(), np.float64, overwrite=True)
        upper = np.triu_indices(cols, 1)
        np.testing.assert_allclose(got[0][upper], want[0][upper], rtol=1e-7, atol=1e-9)
        grid = qparams.weight_only_grid(4)
        s, z = per_row(w, grid)
        q = gptq(w[None], h[None], grid, s[:, None], z[:, None], guard=False,
                 work_dtype=np.float64).q[0]
        assert np.mean(q == reference_gptq(w, h, grid, s, z)) >= 0.99
        if cols > 1:
            with pytest.raises(np.linalg.LinAlgError):
                gptq_module._unit_upper(-h[None], np.float64, overwrite=True)


@FAST
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 10), cols=st.integers(1, 30),
       grid=grids(), act=st.booleans(), scale=st.floats(1e-3, 1e3))
def test_identity_hessian_gives_nearest(seed, rows, cols, grid, act, scale):
    w, _ = problem(seed, rows, cols, 2)
    s, z = per_row(w, grid)
    got = gptq(w[None], np.eye(cols)[None] * scale, grid, s[:, None], z[:, None],
               act_order=act, guard=False)
    np.testing.assert_array_equal(got.q[0], qparams.quantize(w, s, z, grid, 0))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 10), cols=st.integers(1, 40),
       samples=st.integers(1, 120), grid=grids(), act=st.booleans(),
       block=st.sampled_from([0, 4, 16]))
def test_on_the_grid_and_never_worse_than_nearest(seed, rows, cols, samples, grid, act, block):
    """Per row (or per block of columns) parameters; the guard keeps, per row, whichever of
    GPTQ and round-to-nearest has the lower objective."""
    w, h = problem(seed, rows, cols, samples, correlated=seed % 2 == 0)
    layout = WeightLayout(grid, 1, block) if block else WeightLayout(grid, 0)
    start = layouts.nearest(w, layout)
    s = layouts.expand(start.scale, layout, w.shape)
    z = layouts.expand(start.zero_point, layout, w.shape)
    got = gptq(w[None], h[None], grid, s[None], z[None], act_order=act)
    q = got.q[0]
    assert q.shape == w.shape and q.min() >= grid.qmin and q.max() <= grid.qmax
    error = row_errors(w, qparams.dequantize(q, s, z), h).sum()
    nearest = row_errors(w, start.dequantized(), h).sum()
    assert error <= nearest * (1 + 1e-5) + 1e-9
    np.testing.assert_allclose(got.error.sum(), error, rtol=1e-3, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), act=st.booleans())
def test_unguarded_gptq_beats_nearest_on_well_conditioned_layers(seed, bits, act):
    """Many more samples than inputs (the normal case): GPTQ alone lowers the objective,
    within 2% (it is greedy, not optimal)."""
    w, h = problem(seed, 16, 48, 400)
    grid = qparams.weight_only_grid(bits)
    s, z = per_row(w, grid)
    got = gptq(w[None], h[None], grid, s[:, None], z[:, None], act_order=act, guard=False)
    assert got.error.sum() <= got.nearest_error.sum() * 1.02


def test_much_lower_error_than_nearest_on_correlated_inputs():
    w, h = problem(0, 64, 128, 2000)
    for bits in (2, 3, 4, 8):
        grid = qparams.weight_only_grid(bits)
        s, z = per_row(w, grid)
        got = gptq(w[None], h[None], grid, s[:, None], z[:, None], guard=False)
        assert got.error.sum() < 0.8 * got.nearest_error.sum()


def test_dead_inputs_keep_nearest_and_do_not_spread():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 12))
    x[:, [2, 7]] = 0.0  # inputs that never fired
    h = x.T @ x
    w = rng.standard_normal((5, 12)).astype(np.float32)
    grid = qparams.weight_only_grid(4)
    s, z = per_row(w, grid)
    got = gptq(w[None], h[None], grid, s[:, None], z[:, None], guard=False).q[0]
    nearest = qparams.quantize(w, s, z, grid, 0)
    np.testing.assert_array_equal(got[:, [2, 7]], nearest[:, [2, 7]])
    live = [i for i in range(12) if i not in (2, 7)]
    alone = gptq(w[None][..., live], h[np.ix_(live, live)][None], grid, s[:, None],
                 z[:, None], guard=False).q[0]
    assert np.mean(alone == got[:, live]) >= 0.99


def test_indefinite_hessian_raises_damping_and_still_gives_grid_integers():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    grid = qparams.weight_only_grid(3)
    h = np.eye(6)
    h[0, 1] = h[1, 0] = 3.0  # eigenvalues 4 and -2: 1% damping cannot fix it, 1000% can
    s, z = per_row(w, grid)
    got = gptq(w[None], h[None], grid, s[:, None], z[:, None])
    assert not got.fallback[0]
    assert got.q.min() >= grid.qmin and got.q.max() <= grid.qmax
    # Hopeless: negative everywhere. Every column is dead and keeps its nearest integer.
    got = gptq(w[None], -np.eye(6)[None], grid, s[:, None], z[:, None])
    np.testing.assert_array_equal(got.q[0], qparams.quantize(w, s, z, grid, 0))


def test_depthwise_conv_is_one_problem_per_channel():
    rng = np.random.default_rng(3)
    channels = 6
    weight = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)
    hs = []
    for _ in range(channels):
        x = rng.standard_normal((300, 9)) @ (np.eye(9) + 0.3 * rng.standard_normal((9, 9)))
        hs.append(x.T @ x)
    grid = qparams.weight_only_grid(4)
    start = layouts.nearest(weight, WeightLayout(grid, 0))
    s = conv_rows(layouts.expand(start.scale, start.layout, weight.shape), channels)
    z = conv_rows(layouts.expand(start.zero_point, start.layout, weight.shape), channels)
    got = gptq(conv_rows(weight, channels), np.stack(hs), grid, s, z)
    for i in range(channels):
        one = gptq(weight[i].reshape(1, 1, 9), hs[i][None], grid, s[i:i + 1], z[i:i + 1])
        np.testing.assert_array_equal(got.q[i], one.q[0])


# --- layouts -----------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 1000), rows=st.integers(1, 70), cols=st.integers(1, 9),
       block=st.sampled_from([16, 32, 64]), bits=st.integers(2, 8), axis=st.integers(0, 1))
def test_blocked_parameters_are_each_blocks_own_range(seed, rows, cols, block, bits, axis):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols) if axis == 0 else (cols, rows)).astype(np.float32)
    layout = WeightLayout(qparams.weight_only_grid(bits), axis, block)
    made = layouts.nearest(w, layout)
    blocks = -(-rows // block)
    assert made.scale.shape == ((blocks, cols) if axis == 0 else (cols, blocks))
    moved = np.moveaxis(w, axis, 0)
    for b in range(blocks):
        part = moved[b * block:(b + 1) * block]
        s, z = qparams.scale_zero_point(part.min(0), part.max(0), layout.grid)
        np.testing.assert_array_equal(np.take(made.scale, b, axis=axis), s)
        np.testing.assert_array_equal(np.take(made.zero_point, b, axis=axis), z)
    step = layouts.expand(made.scale, layout, w.shape)
    assert np.all(np.abs(made.dequantized() - w) <= step / 2 * (1 + 1e-5) + 1e-7)
    back = made.transposed().transposed()
    np.testing.assert_array_equal(back.q, made.q)
    np.testing.assert_array_equal(back.scale, made.scale)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_blocked_layout_is_what_dequantize_linear_computes(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((200, 24)).astype(np.float32)  # K = 200, not a multiple of 32
    grid = qparams.weight_only_grid(bits)
    made = layouts.nearest(w, WeightLayout(grid, 0, 32))
    storage = grid.storage.numpy()
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0, block_size=32)
    elem = {8: TensorProto.INT8, 4: TensorProto.INT4, 2: TensorProto.INT2}[bits]
    graph = helper.make_graph(
        [node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [200, 24])],
        [numpy_helper.from_array(made.q.astype(storage), "q"),
         numpy_helper.from_array(made.scale, "s"),
         numpy_helper.from_array(made.zero_point.astype(storage), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    assert model.graph.initializer[0].data_type == elem
    (got,) = ReferenceEvaluator(model).run(None, {})
    np.testing.assert_allclose(got, made.dequantized(), rtol=1e-6)


# --- second moments ------------------------------------------------------------------------


def naive_patches(x, kernel, strides, pads, dilations, group):
    n, c, h, w = x.shape
    kh, kw = kernel
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = output_size(h, kh, strides[0], pads[0], pads[2], dilations[0])
    ow = output_size(w, kw, strides[1], pads[1], pads[3], dilations[1])
    cg = c // group
    out = []
    for g in range(group):
        rows = []
        for b in range(n):
            for i in range(oh):
                for j in range(ow):
                    patch = xp[b, g * cg:(g + 1) * cg,
                               i * strides[0]:i * strides[0] + dilations[0] * (kh - 1) + 1:
                               dilations[0],
                               j * strides[1]:j * strides[1] + dilations[1] * (kw - 1) + 1:
                               dilations[1]]
                    rows.append(patch.ravel())
        p = np.array(rows).reshape(-1, cg * kh * kw)
        out.append(p.T @ p)
    return np.stack(out)


conv_cases = st.fixed_dictionaries({
    "n": st.integers(1, 2), "group": st.sampled_from([1, 2, 3]), "cg": st.integers(1, 3),
    "h": st.integers(3, 9), "w": st.integers(3, 9),
    "kh": st.integers(1, 3), "kw": st.integers(1, 3),
    "sh": st.integers(1, 2), "sw": st.integers(1, 3), "dh": st.integers(1, 2),
    "dw": st.integers(1, 2), "pads": st.tuples(*[st.integers(0, 2)] * 4),
    "seed": st.integers(0, 1000)})


def _valid(c) -> bool:
    return (output_size(c["h"], c["kh"], c["sh"], c["pads"][0], c["pads"][2], c["dh"]) > 0
            and output_size(c["w"], c["kw"], c["sw"], c["pads"][1], c["pads"][3], c["dw"]) > 0)


def _moment(c, x) -> Im2colMoment:
    acc = Im2colMoment(x.shape[1], (c["kh"], c["kw"]), (c["sh"], c["sw"]), c["pads"],
                       (c["dh"], c["dw"]), c["group"])
    acc.update(x)
    return acc


@settings(max_examples=60, deadline=None)
@given(conv_cases)
def test_im2col_moment_equals_explicit_patches(c):
    if not _valid(c):
        return
    rng = np.random.default_rng(c["seed"])
    x = rng.standard_normal((c["n"], c["group"] * c["cg"], c["h"], c["w"])).astype(np.float32)
    want = naive_patches(x, (c["kh"], c["kw"]), (c["sh"], c["sw"]), c["pads"],
                         (c["dh"], c["dw"]), c["group"])
    np.testing.assert_allclose(_moment(c, x).matrices(), want, rtol=1e-4, atol=1e-4)


def _ort_conv(x, w, c):
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], strides=[c["sh"], c["sw"]],
                          pads=list(c["pads"]), dilations=[c["dh"], c["dw"]],
                          group=c["group"])],
        "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@settings(max_examples=25, deadline=None)
@given(conv_cases)
def test_im2col_columns_are_in_the_weights_order(c):
    """sum over groups of tr(W_g H_g W_g^T) = the sum of squared Conv outputs (onnxruntime):
    the columns follow `w.reshape(M, -1)` and the padding is ONNX's."""
    if not _valid(c):
        return
    rng = np.random.default_rng(c["seed"])
    g = c["group"]
    x = rng.standard_normal((c["n"], g * c["cg"], c["h"], c["w"])).astype(np.float32)
    w = rng.standard_normal((2 * g, c["cg"], c["kh"], c["kw"])).astype(np.float32)
    y = _ort_conv(x, w, c).astype(np.float64)
    hs = _moment(c, x).matrices()
    rows = conv_rows(w, g).astype(np.float64)
    total = sum(np.trace(rows[i] @ hs[i] @ rows[i].T) for i in range(g))
    np.testing.assert_allclose(total, np.sum(y * y), rtol=1e-4)


lag_cases = st.fixed_dictionaries({
    "c": st.integers(1, 4), "kh": st.integers(1, 5), "kw": st.integers(1, 5),
    "sizes": st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3),
    "pads": st.tuples(*[st.integers(0, 3)] * 4), "seed": st.integers(0, 1000)})


@settings(max_examples=80, deadline=None)
@given(lag_cases)
def test_stride_one_moments_by_lag_equal_explicit_patches(c):
    """Stride-1 convs take their matrix from lagged products, not patches
    (`moments._lagged_blocks`): the sums equal the patches', over inputs of several sizes
    (each size its own windows) streamed one sample at a time."""
    kernel, pads = (c["kh"], c["kw"]), c["pads"]
    rng = np.random.default_rng(c["seed"])
    acc = Im2colMoment(c["c"], kernel, (1, 1), pads, (1, 1))
    cols = c["c"] * c["kh"] * c["kw"]
    want = np.zeros((1, cols, cols))
    for h, w in c["sizes"]:
        if output_size(h, c["kh"], 1, pads[0], pads[2], 1) <= 0 or output_size(
                w, c["kw"], 1, pads[1], pads[3], 1) <= 0:
            continue
        x = rng.standard_normal((2, c["c"], h, w)).astype(np.float32)
        for i in range(2):
            acc.update(x[i:i + 1])
        if c["kh"] * c["kw"] > 1:
            assert acc._padded, "a stride-1 conv should buffer its padded input"
        want = want + naive_patches(x, kernel, (1, 1), pads, (1, 1), 1)
    got = acc.matrices()
    if got is None:
        assert not want.any()
        return
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[0], got[0].T)


@pytest.mark.parametrize("stride", [2, 1])  # patches; lagged products
def test_streaming_equals_one_batch_and_merges(stride):
    """A merge of two accumulators (one already folded, one not) equals one fed every
    sample."""
    x = np.random.default_rng(1).standard_normal((4, 3, 7, 7)).astype(np.float32)
    strides, pads = (stride, stride), (1, 1, 1, 1)
    whole = Im2colMoment(3, (3, 3), strides, pads, (1, 1))
    whole.update(x)
    parts = [Im2colMoment(3, (3, 3), strides, pads, (1, 1)) for _ in range(2)]
    for i in range(4):
        parts[i % 2].update(x[i:i + 1])
    parts[0].matrices()  # folded before the merge; parts[1] is folded by it
    parts[0].update(x[:1])
    parts[0].merge(parts[1])
    want = whole.matrices() + naive_patches(x[:1], (3, 3), strides, pads, (1, 1), 1)
    np.testing.assert_allclose(parts[0].matrices(), want, rtol=1e-5, atol=1e-5)
    side = 4 if stride == 2 else 7
    assert parts[0].rows == whole.rows + side * side == 5 * side * side


def test_same_auto_pad_and_conv1d():
    x = np.random.default_rng(2).standard_normal((2, 4, 20)).astype(np.float32)
    same = Im2colMoment(4, (5,), (2,), (0, 0), (1,), 2, auto_pad="SAME_UPPER")
    same.update(x)
    # SAME_UPPER with n = 20, k = 5, s = 2: 3 pad values in total, 1 before and 2 after.
    explicit = Im2colMoment(4, (5,), (2,), (1, 2), (1,), 2)
    explicit.update(x)
    np.testing.assert_allclose(same.matrices(), explicit.matrices())
    as_2d = naive_patches(x[:, :, None, :], (1, 5), (1, 2), (0, 1, 0, 2), (1, 1), 2)
    np.testing.assert_allclose(same.matrices(), as_2d, rtol=1e-4, atol=1e-4)


def test_memory_is_bounded_by_one_buffer():
    """A 64x112x112 input holds 29 MB of 3x3 patches; one update stays near the padded input
    (3.3 MB), two chunks of 16 MB (one buffered, one being copied) and the 576^2 sum."""
    x = np.random.default_rng(3).standard_normal((1, 64, 112, 112)).astype(np.float32)
    acc = Im2colMoment(64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    tracemalloc.start()
    acc.update(x)
    acc.matrices()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 42e6, peak


def test_subsampled_positions_rotate_over_samples():
    """With many samples, a 1x1 conv over a 9x9 map keeps every s-th row and column, offset
    by one per sample."""
    x = np.random.default_rng(4).standard_normal((1, 2, 9, 9)).astype(np.float32)
    acc = Im2colMoment(2, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), samples=10_000)
    acc.update(x)
    acc.update(x)
    assert acc.stride is not None and acc.stride > 1
    s = acc.stride
    first = x[:, :, ::s, ::s].reshape(2, -1).T.astype(np.float64)
    second = x[:, :, 1::s, 1::s].reshape(2, -1).T.astype(np.float64)
    np.testing.assert_allclose(acc.matrices()[0], first.T @ first + second.T @ second,
                               rtol=1e-5)


def test_dense_moment():
    x = np.random.default_rng(5).standard_normal((3, 10, 6)).astype(np.float32)
    acc = DenseMoment(6)
    acc.update(x[:1])
    acc.update(x[1:])
    flat = x.reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(acc.matrices()[0], flat.T @ flat, rtol=1e-5)
    assert acc.rows == 30


# --- weight correction --------------------------------------------------------------------


shapes = st.sampled_from([(4, 3, 3, 3), (16, 1, 3, 3), (8, 40), (3, 200)])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), shape=shapes, bits=st.integers(2, 8))
def test_correction_folds_the_variance_exactly_and_the_mean_in_whole_steps(seed, shape, bits):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 2) + rng.uniform(-0.5, 0.5)).astype(
        np.float32)
    grid = qparams.weight_only_grid(bits)
    made = layouts.nearest(w, WeightLayout(grid, 0))
    fixed = corrected(w, made, 0)
    np.testing.assert_array_equal(fixed.q, made.q)
    var, mean = correction_factors(w, made.dequantized(), 0)
    mindspore = made.dequantized() * var + mean
    low, high = qparams.container_range(grid.storage)
    assert fixed.zero_point.min() >= low and fixed.zero_point.max() <= high
    # What is left is the part of meanCorr below half a (new) step, where the container
    # did not clip the zero point.
    left = (mindspore - fixed.dequantized()).reshape(shape[0], -1)
    step = fixed.scale.astype(np.float64)
    inside = (fixed.zero_point > low) & (fixed.zero_point < high)
    spread = np.abs(left - left.mean(axis=1, keepdims=True)).max(axis=1)
    assert np.all(spread <= 1e-5 * np.abs(mindspore).max() + 4 * np.spacing(step) * 256)
    assert np.all(np.abs(left.mean(axis=1))[inside] <= step[inside] * 0.5 * (1 + 1e-4))


def test_correction_keeps_symmetric_zero_points_at_zero():
    w = np.random.default_rng(1).standard_normal((8, 40)).astype(np.float32) + 0.3
    made = layouts.nearest(w, WeightLayout(qparams.fused_weight_grid(8), 0))
    fixed = corrected(w, made, 0)
    assert not np.any(fixed.zero_point)
    assert not np.array_equal(fixed.scale, made.scale)


def test_correction_of_blocked_weights_is_per_output_channel():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((100, 12)).astype(np.float32)  # MatMul [K, N], blocks along K
    made = layouts.nearest(w, WeightLayout(qparams.weight_only_grid(4), 0, 32))
    fixed = corrected(w, made, 1)
    var, _ = correction_factors(w, made.dequantized(), 1)
    np.testing.assert_allclose(fixed.scale, made.scale * var, rtol=1e-6)


# --- mixed bit ------------------------------------------------------------------------------


def mindspore_error(w, w_hat):
    n2 = (w.reshape(w.shape[0], -1).astype(np.float64) ** 2).sum(1)
    d2 = ((w - w_hat).reshape(w.shape[0], -1).astype(np.float64) ** 2).sum(1)
    keep = n2 >= 1e-10
    return (1e-10 + np.sqrt(d2[keep] / n2[keep]).sum()) / (keep.sum() + 1e-7)


@FAST
@given(seed=st.integers(0, 1000), target=st.floats(0.001, 0.5))
def test_mixed_bit_picks_the_fewest_bits_that_meet_the_target(seed, target):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * rng.uniform(0.1, 3, (16, 1, 1, 1))
    def layout_for(bits):
        return WeightLayout(qparams.weight_only_grid(bits), 0)
    bits, error = smallest_bits(w, layout_for, target, 0)
    made = layouts.nearest(w, layout_for(bits))
    assert error == pytest.approx(mindspore_error(w, made.dequantized()), rel=1e-9)
    assert error <= target
    if bits > 2:
        fewer = layouts.nearest(w, layout_for(bits - 1))
        assert relative_error(w, fewer.dequantized(), 0) > target



@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 70), st.sampled_from([0, 8, 32]),
       st.integers(0, 2**31 - 1))
def test_binary_weights_take_the_least_squares_level_of_each_slice(rows, cols, block, seed):
    """1 bit: sign(w) * s with s minimising the squared error of each slice (channel or
    block, a last partial block over its own values): s = mean|w|."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 3.0, (rows, 1))
    grid = qparams.weight_only_grid(1)
    layout = WeightLayout(grid, 1, block) if block else WeightLayout(grid, 0)
    deq = layouts.nearest(w, layout).dequantized()
    assert np.all(deq * w >= 0)
    if block:
        for start in range(0, cols, block):
            part = w[:, start:start + block]
            level = np.abs(deq[:, start:start + block])
            assert np.allclose(level, np.abs(part).mean(axis=1, keepdims=True), rtol=1e-6)
    else:
        assert np.allclose(np.abs(deq), np.abs(w).mean(axis=1, keepdims=True), rtol=1e-6)
    # No other level does better on any slice: scaling all of them by 0.9 or 1.1 loses.
    for factor in (0.9, 1.1):
        assert np.sum((w - deq) ** 2) <= np.sum((w - factor * deq) ** 2)
