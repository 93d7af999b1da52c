"""SPEC's three worked examples, exactly; the expected arrays are written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

import tconv

KERNEL = np.array([[1, 2, 3],
                   [2, 2, 1],
                   [3, 2, 1]], dtype=np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_2x2_input_stride_1_gives_the_4x4_of_spec(backend_name, dtype):
    x = np.array([[1, 2],
                  [3, 4]], dtype=dtype).reshape(1, 1, 2, 2)
    expected = np.array([[1, 4, 7, 6],
                         [5, 16, 22, 14],
                         [9, 22, 16, 6],
                         [9, 18, 11, 4]], dtype=dtype).reshape(1, 1, 4, 4)
    out = tconv.conv_transpose2d(x, KERNEL.astype(dtype).reshape(1, 1, 3, 3), np.zeros(1, dtype), stride=1,
                                 padding=0, backend=backend_name)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, expected)


def test_padding_2_crops_the_full_5x5_to_its_centre(backend_name):
    out = tconv.conv_transpose2d(np.ones((1, 1, 3, 3)), KERNEL.reshape(1, 1, 3, 3), stride=1, padding=2,
                                 backend=backend_name)
    # the centre cell collects every tap from every input cell once: the kernel's sum
    np.testing.assert_array_equal(out, np.array([[[[17.0]]]]))


def test_stride_3_output_padding_1_tiles_the_kernel_with_a_zero_border(backend_name):
    out = tconv.conv_transpose2d(np.ones((1, 1, 3, 3)), KERNEL.reshape(1, 1, 3, 3), stride=3,
                                 output_padding=1, backend=backend_name)
    row = [1, 2, 3, 1, 2, 3, 1, 2, 3, 0]
    expected = np.array([
        [1, 2, 3, 1, 2, 3, 1, 2, 3, 0],
        [2, 2, 1, 2, 2, 1, 2, 2, 1, 0],
        [3, 2, 1, 3, 2, 1, 3, 2, 1, 0],
        row,
        [2, 2, 1, 2, 2, 1, 2, 2, 1, 0],
        [3, 2, 1, 3, 2, 1, 3, 2, 1, 0],
        row,
        [2, 2, 1, 2, 2, 1, 2, 2, 1, 0],
        [3, 2, 1, 3, 2, 1, 3, 2, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ], dtype=np.float64)
    assert out.shape == (1, 1, 10, 10)
    np.testing.assert_array_equal(out[0, 0], expected)


def test_first_example_unbatched_and_through_the_layer(backend_name):
    x = np.array([[[1.0, 2.0], [3.0, 4.0]]])  # (C_in, H, W)
    layer = tconv.ConvTranspose2d(1, 1, 3, bias=False, dtype=np.float64)
    layer.weight = KERNEL.reshape(1, 1, 3, 3).copy()
    with tconv.use_backend(backend_name):
        out = layer(x)
    np.testing.assert_array_equal(out[0], [[1, 4, 7, 6], [5, 16, 22, 14], [9, 22, 16, 6], [9, 18, 11, 4]])
