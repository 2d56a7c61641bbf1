"""The range -> scale / zero point core, checked with hypothesis."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ptqconv import qparams

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
matrices = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9), elements=finite
)


@pytest.mark.parametrize(
    ("bits", "storage"),
    [
        (1, ir.DataType.INT2),
        (2, ir.DataType.INT2),
        (3, ir.DataType.INT4),
        (4, ir.DataType.INT4),
        (5, ir.DataType.INT8),
        (8, ir.DataType.INT8),
        (9, ir.DataType.INT16),
        (16, ir.DataType.INT16),
    ],
)
def test_weight_grid_has_exactly_2_pow_bits_levels_in_smallest_container(bits, storage):
    grid = qparams.weight_only_grid(bits)
    assert grid.storage == storage
    assert grid.levels == 2**bits


@settings(max_examples=300, deadline=None)
@given(matrices, st.integers(1, 16), st.integers(0, 2))
def test_dequantized_weight_within_half_step_per_channel(w, bits, axis_pick):
    axis = axis_pick % w.ndim
    grid = qparams.weight_only_grid(bits)
    rmin, rmax = qparams.tensor_range(w, axis)
    scale, zp = qparams.scale_zero_point(rmin, rmax, grid)
    assert np.all(scale > 0)
    assert np.all((zp >= grid.qmin) & (zp <= grid.qmax))
    q = qparams.quantize(w, scale, zp, grid, axis)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    deq = qparams.dequantize(q, scale, zp, axis)
    step = (2 * scale if grid.binary else scale).astype(np.float64)
    shape = [1] * w.ndim
    shape[axis] = -1
    err = np.abs(deq.astype(np.float64) - w)
    # Half a step, plus float32 rounding of the operands.
    bound = step.reshape(shape) / 2 * (1 + 1e-5) + 1e-6 * np.abs(w) + 1e-30
    assert np.all(err <= bound)


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e3, 0), st.floats(0, 1e3), st.integers(1, 8))
def test_zero_is_exact_on_affine_grids(lo, hi, bits):
    grid = qparams.Grid(bits, 0, 2**bits - 1, ir.DataType.UINT8, symmetric=False)
    scale, zp = qparams.scale_zero_point(lo, hi, grid)
    q = qparams.quantize(np.zeros(1, np.float32), scale, zp, grid)
    assert qparams.dequantize(q, scale, zp)[0] == 0.0


def test_degenerate_range_gives_positive_scale():
    grid = qparams.weight_only_grid(8)
    scale, zp = qparams.scale_zero_point(np.zeros(3), np.zeros(3), grid)
    assert np.all(scale > 0) and np.all(np.isfinite(scale))
    q = qparams.quantize(np.zeros((3, 4), np.float32), scale, zp, grid, axis=0)
    assert np.all(qparams.dequantize(q, scale, zp, axis=0) == 0)


def test_rounding_is_half_to_even_like_quantizelinear():
    grid = qparams.Grid(8, -128, 127, ir.DataType.INT8, symmetric=True)
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32)
    q = qparams.quantize(x, np.float32(1.0), np.int64(0), grid)
    assert q.tolist() == [0, 2, 2, 0, -2]


def test_one_bit_grid_is_binary_plus_minus():
    grid = qparams.weight_only_grid(1)
    w = np.array([[-3.0, -0.1, 0.2, 4.0]], np.float32)
    scale, zp = qparams.scale_zero_point(*qparams.tensor_range(w, 0), grid)
    q = qparams.quantize(w, scale, zp, grid, 0)
    assert set(q.ravel().tolist()) == {-1, 1}
    assert np.allclose(qparams.dequantize(q, scale, zp, 0), [[-2, -2, 2, 2]])


def test_scalar_tensors_quantize():
    grid = qparams.activation_grid(8)
    scale, zp = qparams.scale_zero_point(-1.0, 1.0, grid)
    q = qparams.quantize(np.array(0.5, np.float32), scale, zp, grid, dtype=np.uint8)
    assert q.shape == () and abs(qparams.dequantize(q, scale, zp) - 0.5) <= scale / 2


@given(st.floats(-1e4, 0), st.floats(0, 1e4), st.integers(2, 16))
def test_float16_scale_is_rounded_up_so_the_range_still_fits(lo, hi, bits):
    grid = qparams.weight_only_grid(bits)
    scale32, _ = qparams.scale_zero_point(lo, hi, grid)
    scale16, zp = qparams.scale_zero_point(lo, hi, grid, np.float16)
    assert scale16.dtype == np.float16 and scale16 > 0
    assert scale16.astype(np.float64) >= scale32.astype(np.float64) * (1 - 1e-6)
    ends = np.array([lo, hi], np.float32)
    q = qparams.quantize(ends, scale16, zp, grid, dtype=np.int64)
    back = qparams.dequantize(q, scale16.astype(np.float32), zp)
    # Neither end is clipped: both come back within half a (float16) step.
    assert np.all(np.abs(back - ends) <= float(scale16) / 2 * (1 + 1e-3) + 1e-6 * np.abs(ends))


@pytest.mark.parametrize("bits", [8, 5, 2, 1])
def test_fake_quantize_is_bit_for_bit_quantize_then_dequantize(bits):
    rng = np.random.default_rng(bits)
    grid = qparams.activation_grid(bits)
    for _ in range(10):
        x = (rng.standard_normal((2, 9, 13)) * rng.uniform(0.01, 100)).astype(np.float32)
        scale = np.float32(rng.uniform(1e-4, 1))
        zero_point = int(rng.integers(grid.qmin, grid.qmax + 1))
        expected = qparams.dequantize(qparams.quantize(x, scale, zero_point, grid), scale,
                                      zero_point)
        got = qparams.fake_quantize(x, scale, zero_point, grid)
        assert got.dtype == np.float32 and np.array_equal(got, expected)


def test_fixed_grids_have_a_step_of_one_over_an_integer():
    grid = qparams.activation_grid(8)
    # onnxruntime's QLinearSoftmax wants exactly 1/256 with zp 0.
    assert qparams.fixed_scale_zero_point(0.0, 1.0, grid) == (np.float32(1 / 256), 0)
    # Tanh: 1/128 with -1 on the grid, so tanh = 2 sigmoid(2x) - 1 moves the zp by 128.
    assert qparams.fixed_scale_zero_point(-1.0, 1.0, grid) == (np.float32(1 / 128), 128)
    assert qparams.fixed_scale_zero_point(-1.0, 1.0, qparams.activation_grid(4)) == (
        np.float32(1 / 8), 8)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 12), st.integers(0, 2**31 - 1), st.booleans())
def test_an_all_zero_channel_takes_its_neighbours_largest_scale(channels, seed, symmetric):
    """Pruned channels are exact on any grid; a floor-sized scale made their int32 bias
    scale too fine for their bias."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, 5)).astype(np.float32)
    zero = rng.random(channels) < 0.4
    zero[rng.integers(channels)] = False  # at least one channel holds values
    w[zero] = 0.0
    grid = (qparams.Grid(8, -127, 127, ir.DataType.INT8, symmetric=True) if symmetric
            else qparams.Grid(8, 0, 255, ir.DataType.UINT8, symmetric=False))
    rmin, rmax = qparams.tensor_range(w, axis=0)
    scale, zero_point = qparams.scale_zero_point(rmin, rmax, grid)
    assert np.all(scale[zero] == scale[~zero].max())
    q = qparams.quantize(w, scale, zero_point, grid, axis=0)
    dequantized = (q.astype(np.float64) - zero_point[:, None]) * scale[:, None]
    assert np.all(dequantized[zero] == 0.0)
    # One value: no neighbour to borrow from; the floor stays.
    one, _ = qparams.scale_zero_point(np.zeros(1), np.zeros(1), grid)
    assert 0 < one[0] < 1e-6


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**31 - 1), st.booleans(), st.booleans(),
       st.floats(1e-12, 1e-2))
def test_a_raised_weight_scale_makes_the_int32_bias_hold(channels, seed, symmetric, tensor,
                                                         input_scale):
    """Where input scale x weight scale is too fine for the bias (an input that was constant
    in calibration), the weight range widens just enough; where it holds, nothing moves."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((channels, 6)) * 10.0 ** rng.uniform(-4, 0)).astype(np.float32)
    bias = rng.standard_normal(channels) * 10.0 ** rng.uniform(-2, 3)
    grid = (qparams.Grid(8, -63, 63, ir.DataType.INT8, symmetric=True) if symmetric
            else qparams.Grid(8, 0, 255, ir.DataType.UINT8, symmetric=False))
    rmin, rmax = qparams.tensor_range(w, axis=None if tensor else 0)
    scale, _ = qparams.scale_zero_point(rmin, rmax, grid)
    floor = qparams.bias_scale_floor(bias, input_scale, int(np.size(scale)))
    low, high = qparams.widened_range(rmin, rmax, grid, np.maximum(scale, floor))
    raised, _ = qparams.scale_zero_point(low, high, grid)
    assert np.all(raised >= scale * (1 - 1e-6))
    q_bias = np.rint(bias / (input_scale * np.broadcast_to(raised.astype(np.float64),
                                                           bias.shape)))
    assert np.abs(q_bias).max() <= 2**31 - 1  # nothing saturates
    # The widened range still holds the weights, and no wider than the bias needs.
    assert np.all(low <= rmin) and np.all(high >= rmax)
    assert np.allclose(raised, np.maximum(scale, floor), rtol=1e-5, atol=0)
