"""tconv against the definition itself: the plain-loop oracle of ``tests/oracle.py``.

Random cases draw every argument SPEC lists (stride, every padding form,
output_padding or output_size, dilation, groups with depthwise, bias,
unbatched input, N = 0) in 1, 2 and 3 dims, float32 and float64. The pads
of ``"same"``/``"same_lower"`` come from ONNX's rule written in conftest,
not from ``tconv.shape``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

DIMS = pytest.mark.parametrize("ndim", [1, 2, 3])
KINDS = pytest.mark.parametrize("transposed", [True, False], ids=["conv_transpose", "conv"])


@DIMS
@KINDS
@settings(max_examples=60)
@given(data=st.data())
def test_matches_loop_definition(backend_name, cases, assert_close, ndim, transposed, data):
    case = data.draw(cases(transposed=transposed, ndim=ndim), label="case")
    x, w, b = case.arrays()
    got = case.run(x, w, b, backend_name)
    assert got.dtype == np.dtype(case.dtype)
    assert_close(got, case.expected(x, w, b))


@DIMS
@KINDS
@settings(max_examples=10)
@given(data=st.data())
def test_same_modes_match_loop_definition(backend_name, cases, assert_close, ndim, transposed, data):
    # the "same" modes (with and without output_size) get their own draws: the
    # general test above spreads its examples over six padding forms
    case = data.draw(cases(transposed=transposed, ndim=ndim, padding_forms=("same", "same_lower")), label="case")
    x, w, b = case.arrays()
    assert_close(case.run(x, w, b, backend_name), case.expected(x, w, b))


@DIMS
@settings(max_examples=10)
@given(data=st.data())
def test_depthwise_and_grouped_batches(backend_name, cases, assert_close, ndim, data):
    case = data.draw(cases(ndim=ndim, unbatched=False, empty_batch=False), label="case")
    x, w, b = case.arrays()
    assert_close(case.run(x, w, b, backend_name), case.expected(x, w, b))


@pytest.mark.parametrize("transposed", [True, False], ids=["conv_transpose", "conv"])
def test_empty_batch_gives_empty_result_of_right_shape(backend_name, transposed):
    import tconv

    x = np.zeros((0, 4, 5, 3))
    if transposed:
        w = np.ones((4, 3, 2, 2))
        out = tconv.conv_transpose2d(x, w, np.ones(6), stride=2, groups=2, backend=backend_name)
        assert out.shape == (0, 6, 10, 6)
    else:
        w = np.ones((6, 2, 2, 2))
        out = tconv.conv2d(x, w, np.ones(6), stride=2, groups=2, backend=backend_name)
        assert out.shape == (0, 6, 2, 1)
    assert out.dtype == np.float64
