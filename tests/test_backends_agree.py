"""Every backend that can run here agrees with the ``numpy`` reference.

Random cases draw every argument SPEC lists (1-3 dims, groups, stride,
dilation, asymmetric and "same" padding, output_padding/output_size, bias,
unbatched and empty batches, float32/float64); each available backend must
give the reference's forward output and all three gradients, transposed and
regular. ``cupy`` joins where it can run (a GPU with CuPy).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tconv

REFERENCE = "numpy"
BACKENDS = sorted(i.name for i in tconv.list_backends() if i.available and i.name != REFERENCE)


def _to_numpy(array):
    return None if array is None else np.asarray(array.get() if hasattr(array, "get") else array)


def _everything(case, backend):
    """Forward output and (grad_x, grad_w, grad_b) of ``case`` on ``backend``."""
    x, w, b = case.arrays()
    out = case.run(x, w, b, backend)
    grads = case.backward_function(case.grad_output(), x, w, **case.kwargs(), backend=backend)
    return [_to_numpy(out), *map(_to_numpy, grads)]


@pytest.mark.skipif(not BACKENDS, reason="no backend other than the reference can run here")
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_backend_agrees_with_numpy_forward_and_backward(backend, cases, assert_close, data):
    case = data.draw(cases(max_work=20000))
    expected = _everything(case, REFERENCE)
    got = _everything(case, backend)
    for what, g, e in zip(("output", "grad_x", "grad_weight", "grad_bias"), got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, (what, g.shape, e.shape, g.dtype, e.dtype)
        assert_close(g, e, dtype=case.dtype)


# Layers of real networks, larger than the random cases: several threads,
# folded samples and column tiles get exercised on every backend.
NETWORK_LAYERS = {
    "dcgan_up": dict(transposed=True, x=(8, 32, 4, 4), w=(32, 16, 4, 4), stride=2, padding=1),
    "unet_up": dict(transposed=True, x=(2, 16, 24, 24), w=(16, 8, 2, 2), stride=2, padding=0),
    "resnet_3x3": dict(transposed=False, x=(1, 16, 28, 28), w=(16, 16, 3, 3), stride=1, padding=1),
    "depthwise_1d": dict(transposed=True, x=(3, 8, 50), w=(8, 1, 5), stride=3, padding=2, groups=8),
    "volume_3d": dict(transposed=True, x=(2, 4, 5, 6, 7), w=(4, 3, 3, 3, 3), stride=2, padding=1),
}


@pytest.mark.skipif(not BACKENDS, reason="no backend other than the reference can run here")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", sorted(NETWORK_LAYERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backend_agrees_on_network_layers(backend, layer, dtype, assert_close):
    spec = dict(NETWORK_LAYERS[layer])
    transposed = spec.pop("transposed")
    rng = np.random.default_rng(len(layer))
    x = rng.standard_normal(spec.pop("x")).astype(dtype)
    w = rng.standard_normal(spec.pop("w")).astype(dtype)
    ndim = x.ndim - 2
    c_out = w.shape[1] * spec.get("groups", 1) if transposed else w.shape[0]
    b = rng.standard_normal(c_out).astype(dtype)
    name = ("conv_transpose" if transposed else "conv") + f"{ndim}d"
    forward, backward = getattr(tconv, name), getattr(tconv, name + "_backward")
    results = {}
    for which in (REFERENCE, backend):
        out = forward(x, w, b, **spec, backend=which)
        dy = np.cos(np.arange(out.size)).astype(dtype).reshape(out.shape)
        results[which] = [_to_numpy(out), *map(_to_numpy, backward(dy, x, w, **spec, backend=which))]
    for g, e in zip(results[backend], results[REFERENCE]):
        assert g.dtype == dtype
        assert_close(g, e)
