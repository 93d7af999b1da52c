"""The per-call caches must never change what a call does.

A repeated call skips argument handling (``tconv.functional``'s plan cache),
finds its backend in one lookup and reads the environment through a cached
token (``tconv.registry``). Each test here first warms those caches with a
call, then changes one thing the caches must notice, and checks that the next
call behaves as a fresh one would.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import tconv
import tconv.functional as F
from tconv import registry
from tconv.backend import Geometry
from tconv.layers import Conv2d, ConvTranspose2d

# SPEC's first worked example
X = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 2, 2)
W = np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)
EXPECTED = np.array(
    [[1, 4, 7, 6], [7, 23, 33, 24], [19, 53, 63, 42], [21, 52, 59, 36]], dtype=np.float32
).reshape(1, 1, 4, 4)


def _warm():
    for _ in range(2):
        np.testing.assert_array_equal(F.conv_transpose2d(X, W), EXPECTED)


# --------------------------------------------------------------------------- #
# results
# --------------------------------------------------------------------------- #
def test_repeated_calls_give_the_worked_example(backend_name):
    for _ in range(3):
        out = F.conv_transpose2d(X, W, backend=backend_name)
        assert out.dtype == np.float32 and out.shape == (1, 1, 4, 4)
        np.testing.assert_allclose(out, EXPECTED, rtol=1e-6)


def test_a_cached_call_takes_any_layout_of_the_same_shape_and_dtype(backend_name):
    F.conv_transpose2d(X, W, backend=backend_name)
    x_f = np.asfortranarray(X)
    x_strided = np.zeros((1, 1, 2, 4), np.float32)[..., ::2]
    x_strided[...] = X
    x_ro = X.copy()
    x_ro.setflags(write=False)
    w_f = np.asfortranarray(W)
    for x, w in ((x_f, W), (x_strided, W), (x_ro, w_f), (X[:, :, ::-1, ::-1][:, :, ::-1, ::-1], W)):
        np.testing.assert_allclose(F.conv_transpose2d(x, w, backend=backend_name), EXPECTED, rtol=1e-6)


def test_a_cached_call_sees_new_values_in_the_same_arrays(backend_name):
    x, w = X.copy(), W.copy()
    first = F.conv_transpose2d(x, w, backend=backend_name)
    x *= 2
    w[0, 0, 0, 0] = 0
    again = F.conv_transpose2d(x, w, backend=backend_name)
    expected = F.conv_transpose2d(x, w, backend="numpy")
    np.testing.assert_allclose(again, expected, rtol=1e-6)
    assert not np.allclose(first, again)


def test_outputs_are_fresh_arrays(backend_name):
    a = F.conv_transpose2d(X, W, backend=backend_name)
    b = F.conv_transpose2d(X, W, backend=backend_name)
    assert not np.shares_memory(a, b)
    a[...] = -1
    np.testing.assert_allclose(b, EXPECTED, rtol=1e-6)


@pytest.mark.parametrize("dtype, result", [(np.float64, np.float64), (np.int32, np.float64),
                                           (np.float16, np.float16)])
def test_dtypes_after_a_float32_call(backend_name, dtype, result):
    F.conv_transpose2d(X, W, backend=backend_name)
    out = F.conv_transpose2d(X.astype(dtype), W.astype(dtype), backend=backend_name)
    assert out.dtype == result
    np.testing.assert_allclose(out.astype(np.float64), EXPECTED, rtol=1e-3)


def test_bias_and_no_bias_are_cached_apart(backend_name):
    bias = np.array([10], np.float32)
    for _ in range(2):
        np.testing.assert_allclose(F.conv_transpose2d(X, W, backend=backend_name), EXPECTED, rtol=1e-6)
        np.testing.assert_allclose(F.conv_transpose2d(X, W, bias, backend=backend_name), EXPECTED + 10,
                                   rtol=1e-6)
        np.testing.assert_allclose(F.conv_transpose2d(X, W, bias.astype(np.float64), backend=backend_name),
                                   EXPECTED + 10, rtol=1e-6)


def test_regular_convolution_repeats(backend_name):
    x = np.arange(25, dtype=np.float64).reshape(1, 1, 5, 5)
    expected = F.conv2d(x, W.astype(np.float64), backend="numpy")
    for _ in range(3):
        np.testing.assert_allclose(F.conv2d(x, W.astype(np.float64), backend=backend_name), expected,
                                   rtol=1e-12)


def test_empty_problems_after_a_cached_call(backend_name):
    F.conv_transpose2d(X, W, backend=backend_name)
    for _ in range(2):
        out = F.conv_transpose2d(np.zeros((0, 1, 2, 2), np.float32), W, backend=backend_name)
        assert out.shape == (0, 1, 4, 4)


# --------------------------------------------------------------------------- #
# arguments that hash like cached ones but must still be refused
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, value", [("stride", True), ("stride", 1.0), ("groups", True),
                                         ("groups", 1.0), ("dilation", 1.0), ("padding", 0.0),
                                         ("output_padding", False), ("stride", np.float64(1.0))])
def test_lookalike_arguments_are_still_checked(name, value):
    _warm()
    fresh_error = None
    try:
        expected = F.conv_transpose2d(X, W, **{name: value})
    except (TypeError, ValueError) as exc:
        fresh_error = exc
    _warm()
    if fresh_error is None:
        np.testing.assert_allclose(F.conv_transpose2d(X, W, **{name: value}), expected)
    else:
        with pytest.raises(type(fresh_error)) as info:
            F.conv_transpose2d(X, W, **{name: value})
        assert str(info.value) == str(fresh_error)


def test_errors_are_unchanged_after_a_cached_call():
    _warm()
    with pytest.raises(ValueError, match="weight must be 4-D"):
        F.conv_transpose2d(X, W[0])
    with pytest.raises(ValueError, match="bias must have shape"):
        F.conv_transpose2d(X, W, np.ones(2, np.float32))
    with pytest.raises(TypeError, match="complex"):
        F.conv_transpose2d(X.astype(np.complex64), W)


# --------------------------------------------------------------------------- #
# backend selection stays live
# --------------------------------------------------------------------------- #
def test_set_backend_and_use_backend_take_effect_after_cached_calls(spy):
    _warm()
    tconv.set_backend("spy")
    _warm()
    assert spy.calls == 2
    tconv.set_backend(None)
    _warm()
    assert spy.calls == 2
    with tconv.use_backend("spy"):
        _warm()
        F.conv_transpose2d(X, W, backend="numpy")
    assert spy.calls == 4
    _warm()
    F.conv_transpose2d(X, W, backend="spy")
    assert spy.calls == 5


def test_tconv_backend_set_at_run_time_is_read(spy, monkeypatch):
    monkeypatch.delenv("TCONV_BACKEND", raising=False)
    default = tconv.get_backend()
    _warm()
    monkeypatch.setenv("TCONV_BACKEND", "spy")
    assert tconv.get_backend() == "spy"
    _warm()
    assert spy.calls == 2
    monkeypatch.setenv("TCONV_BACKEND", "no-such-backend")
    for _ in range(2):  # refused every time, not once
        with pytest.raises(tconv.BackendError, match="no-such-backend"):
            F.conv_transpose2d(X, W)
    monkeypatch.setenv("TCONV_BACKEND", " spy ")
    _warm()
    assert spy.calls == 4
    monkeypatch.delenv("TCONV_BACKEND")
    assert tconv.get_backend() == default
    _warm()
    assert spy.calls == 4


def test_tconv_backend_is_read_when_os_environ_is_replaced(spy, monkeypatch):
    _warm()
    import os

    monkeypatch.setattr(os, "environ", {"TCONV_BACKEND": "spy"})
    _warm()
    assert spy.calls == 2


def test_reloading_the_registry_forgets_resolved_backends(spy):
    F.conv_transpose2d(X, W, backend="spy")
    F.conv_transpose2d(X, W, backend="spy")
    assert spy.calls == 2
    replacement = type(spy)()
    registry.register_backend(replacement, name="spy")
    F.conv_transpose2d(X, W, backend="spy")
    assert (spy.calls, replacement.calls) == (2, 1)
    registry.reload_backends()
    with pytest.raises(tconv.BackendError, match="unknown backend 'spy'"):
        F.conv_transpose2d(X, W, backend="spy")


# --------------------------------------------------------------------------- #
# the thread budget stays live
# --------------------------------------------------------------------------- #
def test_tconv_num_threads_set_at_run_time_is_read(monkeypatch):
    monkeypatch.delenv("TCONV_NUM_THREADS", raising=False)
    tconv.set_num_threads(None)
    default = tconv.get_num_threads()
    monkeypatch.setenv("TCONV_NUM_THREADS", "3")
    assert tconv.get_num_threads() == 3
    monkeypatch.setenv("TCONV_NUM_THREADS", "5")
    assert tconv.get_num_threads() == 5
    monkeypatch.setenv("TCONV_NUM_THREADS", "zero")
    for _ in range(2):
        with pytest.raises(ValueError, match="TCONV_NUM_THREADS must be a positive integer, got 'zero'"):
            tconv.get_num_threads()
    monkeypatch.delenv("TCONV_NUM_THREADS")
    assert tconv.get_num_threads() == default


# --------------------------------------------------------------------------- #
# layers
# --------------------------------------------------------------------------- #
def test_layer_hyper_parameters_changed_after_a_call_take_effect():
    layer = ConvTranspose2d(1, 1, 3, bias=False)
    layer.weight = W.copy()
    np.testing.assert_allclose(layer(X), EXPECTED, rtol=1e-6)
    layer.stride = 2
    assert layer(X).shape == (1, 1, 5, 5)
    layer.padding = 1
    assert layer(X).shape == (1, 1, 3, 3)
    layer.output_padding = 1
    assert layer(X).shape == (1, 1, 4, 4)
    assert layer(X, output_size=(3, 3)).shape == (1, 1, 3, 3)

    conv = Conv2d(1, 1, 3, bias=False)
    x = np.ones((1, 1, 5, 5), np.float32)
    assert conv(x).shape == (1, 1, 3, 3)
    conv.padding = "same"
    assert conv(x).shape == (1, 1, 5, 5)
    with pytest.raises(TypeError, match="output_size applies to transposed convolutions only"):
        conv(x, output_size=(5, 5))


def test_layer_errors_name_the_functional_call():
    layer = ConvTranspose2d(1, 1, 3)
    layer(X)
    with pytest.raises(ValueError, match="^conv_transpose2d: x has 2 input channels"):
        layer(np.ones((1, 2, 2, 2), np.float32))


# --------------------------------------------------------------------------- #
# Geometry keeps the dataclass's hash and equality
# --------------------------------------------------------------------------- #
def test_geometry_hash_is_its_fields_hash():
    geom = Geometry((1, 4, 4), (1, 2, 2), (1, 3, 3), (1, 1, 1), (1, 1, 1), (0, 0, 0), 1)
    fields = dataclasses.astuple(geom)
    assert hash(geom) == hash(fields) == hash(geom)
    same = dataclasses.replace(geom)
    assert same == geom and hash(same) == hash(geom) and len({geom, same}) == 1
    other = dataclasses.replace(geom, groups=2)
    assert other != geom
    assert repr(geom).startswith("Geometry(image=(1, 4, 4)")
    with pytest.raises(dataclasses.FrozenInstanceError):
        geom.groups = 3
