"""Layers ``ConvTranspose{1,2,3}d`` and ``Conv{1,2,3}d`` against PyTorch's modules.

Initialisation bounds, forward with the same weights, a replaced ``.weight``,
``output_size`` at call time, and ``backward`` against autograd.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import tconv



@pytest.fixture(scope="module")
def torch():
    """PyTorch, for the tests that compare with it (the others run without it)."""
    return pytest.importorskip("torch")

# (class name, in_channels, out_channels, kernel_size, keyword arguments)
CONFIGS = [
    ("ConvTranspose1d", 4, 6, 3, dict(stride=2, padding=1, output_padding=1, groups=2)),
    ("ConvTranspose2d", 3, 4, (3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    ("ConvTranspose2d", 4, 4, 3, dict(stride=2, groups=4, bias=False)),  # depthwise
    ("ConvTranspose3d", 2, 3, 2, dict(stride=2, padding=(0, 1, 0), output_padding=(1, 0, 1))),
    ("Conv1d", 4, 6, 3, dict(stride=2, padding=1, groups=2)),
    ("Conv2d", 3, 4, (3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    ("Conv2d", 4, 8, 3, dict(padding=1, groups=4, bias=False)),  # depthwise
    ("Conv3d", 2, 3, 2, dict(stride=(1, 2, 1), padding=1)),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CONFIGS)]


def ndim_of(name: str) -> int:
    return int(name[-2])


def make_pair(torch, name, c_in, c_out, k, kwargs, seed=0):
    """A tconv layer (float64) and a torch module holding the same parameters."""
    layer = getattr(tconv, name)(c_in, c_out, k, **kwargs, dtype=np.float64, rng=seed)
    module = getattr(torch.nn, name)(c_in, c_out, k, **kwargs, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.weight))
        if layer.bias is not None:
            module.bias.copy_(torch.from_numpy(layer.bias))
    return layer, module


def sample_input(c_in, ndim, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, c_in) + (5, 4, 3)[:ndim])


@pytest.mark.parametrize("name, c_in, c_out, k, kwargs", CONFIGS, ids=IDS)
def test_init_is_uniform_within_torch_bound(torch, name, c_in, c_out, k, kwargs):
    layer = getattr(tconv, name)(c_in, c_out, k, **kwargs)
    module = getattr(torch.nn, name)(c_in, c_out, k, **kwargs)
    assert layer.weight.shape == tuple(module.weight.shape)
    assert layer.weight.dtype == np.float32  # the default dtype
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(module.weight)
    bound = 1 / math.sqrt(fan_in)
    bound32 = bound * (1 + 2**-23)  # the float32 rounding of a draw may step past the bound
    assert np.all(np.abs(layer.weight) <= bound32)
    assert float(module.weight.detach().abs().max()) <= bound32  # the same bound is torch's
    if module.bias is None:
        assert layer.bias is None
    else:
        assert layer.bias.shape == tuple(module.bias.shape)
        assert np.all(np.abs(layer.bias) <= bound32)


@pytest.mark.parametrize("name", ["ConvTranspose2d", "Conv2d"])
def test_init_fills_the_interval_uniformly(name):
    layer = getattr(tconv, name)(32, 32, 4, rng=0)
    fan_in = 32 * 16  # weight.shape[1] * prod(kernel), for both kinds
    bound = 1 / math.sqrt(fan_in)
    w = layer.weight.astype(np.float64)
    assert np.max(np.abs(w)) > 0.99 * bound
    assert abs(w.mean()) < 0.02 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.02 * bound  # the std of U(-b, b)
    assert np.max(np.abs(layer.bias)) <= bound * (1 + 2**-23)


def test_rng_makes_init_reproducible():
    a, b, c = (tconv.ConvTranspose2d(3, 4, 3, rng=seed) for seed in (5, 5, 6))
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert not np.array_equal(a.weight, c.weight)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_argument_sets_parameters_and_output_dtype(dtype):
    layer = tconv.ConvTranspose1d(2, 3, 3, dtype=dtype)
    assert layer.weight.dtype == dtype and layer.bias.dtype == dtype
    assert layer(np.ones((1, 2, 4), dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("name, c_in, c_out, k, kwargs", CONFIGS, ids=IDS)
def test_forward_matches_torch_module(torch, backend_name, assert_close, name, c_in, c_out, k, kwargs):
    layer, module = make_pair(torch, name, c_in, c_out, k, kwargs)
    x = sample_input(c_in, ndim_of(name))
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    with tconv.use_backend(backend_name):
        got = layer(x)
    assert_close(got, expected)


@pytest.mark.parametrize("name", ["ConvTranspose2d", "Conv2d"])
def test_replaced_weight_of_another_kernel_size_is_used(torch, backend_name, assert_close, name):
    layer = getattr(tconv, name)(2, 3, 3, padding=1, dtype=np.float64)
    rng = np.random.default_rng(2)
    layer.weight = rng.standard_normal(layer.weight.shape[:2] + (5, 4))
    layer.bias = rng.standard_normal(3)
    x = sample_input(2, 2)
    fn = torch.nn.functional.conv_transpose2d if name.startswith("ConvTranspose") else torch.nn.functional.conv2d
    expected = fn(torch.from_numpy(x), torch.from_numpy(layer.weight), torch.from_numpy(layer.bias), padding=1)
    with tconv.use_backend(backend_name):
        got = layer(x)
        assert_close(got, expected.numpy())
        # backward follows the weight the forward used
        layer.backward(np.ones(got.shape))
    assert layer.weight_grad.shape == layer.weight.shape


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("full_shape", [False, True], ids=["spatial", "full_shape"])
def test_output_size_at_call_time_matches_torch(torch, backend_name, assert_close, ndim, full_shape):
    name = f"ConvTranspose{ndim}d"
    layer, module = make_pair(torch, name, 2, 3, 3, dict(stride=3, padding=1))
    x = sample_input(2, ndim)
    smallest = [(i - 1) * 3 - 2 + 3 for i in x.shape[2:]]
    size = [m + e for m, e in zip(smallest, (2, 1, 0))]  # each within smallest .. smallest + 2
    wanted = [2, 3, *size] if full_shape else size
    with torch.no_grad():
        expected = module(torch.from_numpy(x), output_size=wanted).numpy()
    with tconv.use_backend(backend_name):
        got = layer(x, output_size=wanted)
    assert got.shape == expected.shape == (2, 3, *size)
    assert_close(got, expected)


@pytest.mark.parametrize("name", ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                                  "Conv1d", "Conv2d", "Conv3d"])
def test_backward_before_forward_is_a_clear_error(name):
    layer = getattr(tconv, name)(2, 2, 1)
    with pytest.raises((RuntimeError, ValueError)) as info:
        layer.backward(np.ones((1, 2) + (3,) * ndim_of(name)))
    assert "forward" in str(info.value)


def torch_module_gradients(torch, module, x, grad_output):
    tx = torch.tensor(x, requires_grad=True)
    module.zero_grad()
    module(tx).backward(torch.from_numpy(grad_output))
    return tx.grad.numpy(), module.weight.grad.numpy(), None if module.bias is None else module.bias.grad.numpy()


@pytest.mark.parametrize("name, c_in, c_out, k, kwargs", CONFIGS, ids=IDS)
def test_backward_matches_torch_autograd(torch, backend_name, assert_close, name, c_in, c_out, k, kwargs):
    layer, module = make_pair(torch, name, c_in, c_out, k, kwargs)
    x = sample_input(c_in, ndim_of(name))
    with tconv.use_backend(backend_name):
        out = layer(x)
        grad_output = np.random.default_rng(3).standard_normal(out.shape)
        grad_x = layer.backward(grad_output)
    expected_x, expected_w, expected_b = torch_module_gradients(torch, module, x, grad_output)
    assert_close(grad_x, expected_x, rtol=1e-10)
    assert_close(layer.weight_grad, expected_w, rtol=1e-10)
    if expected_b is None:
        assert layer.bias_grad is None
    else:
        assert_close(layer.bias_grad, expected_b, rtol=1e-10)


def test_backward_uses_the_last_forward_call(torch, backend_name, assert_close):
    layer, module = make_pair(torch, "ConvTranspose2d", 2, 3, 3, dict(stride=2))
    first, second = sample_input(2, 2, seed=1), sample_input(2, 2, batch=1, seed=2)
    with tconv.use_backend(backend_name):
        layer(first)
        out = layer(second)
        grad_x = layer.backward(np.ones(out.shape))
    expected_x, expected_w, _ = torch_module_gradients(torch, module, second, np.ones(out.shape))
    assert_close(grad_x, expected_x, rtol=1e-10)
    assert_close(layer.weight_grad, expected_w, rtol=1e-10)


def test_backward_after_forward_with_output_size(torch, backend_name, assert_close):
    layer, module = make_pair(torch, "ConvTranspose2d", 2, 3, 3, dict(stride=2, padding=1))
    x = sample_input(2, 2)
    size = [10, 8]  # smallest (5-1)*2 - 2 + 3 = 9 and 7: output_padding 1 in both dims
    with tconv.use_backend(backend_name):
        out = layer(x, output_size=size)
        grad_x = layer.backward(np.ones(out.shape))
    tx = torch.tensor(x, requires_grad=True)
    module(tx, output_size=size).backward(torch.ones(out.shape, dtype=torch.float64))
    assert_close(grad_x, tx.grad.numpy(), rtol=1e-10)
    assert_close(layer.weight_grad, module.weight.grad.numpy(), rtol=1e-10)
    assert_close(layer.bias_grad, module.bias.grad.numpy(), rtol=1e-10)
