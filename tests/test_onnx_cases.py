"""ONNX's published ConvTranspose (and Conv) node test cases, mapped onto tconv.

The ``onnx`` package ships them (``onnx.backend.test.case.node``): each case
is a one-node model with its input and output arrays. Every ConvTranspose
case found is run, or listed in ``SKIPPED`` with the reason; an attribute the
mapping does not know fails the test instead of being ignored.

ONNX -> tconv:

=================  ==========================================================
``strides``        ``stride``
``dilations``      ``dilation``
``group``          ``groups``
``output_padding`` ``output_padding``
``kernel_shape``   (checked against the weight, which is where tconv reads it)
``pads``           ``padding`` as ``(begin, end)`` pairs; ONNX orders them
                   ``[b1, b2, ..., e1, e2, ...]``
``auto_pad``       ``SAME_UPPER`` -> ``"same"``, ``SAME_LOWER`` ->
                   ``"same_lower"``, ``VALID`` -> ``"valid"``
``output_shape``   ``output_size``; with ``auto_pad`` NOTSET ONNX splits the
                   crop as SAME_LOWER does, so it maps to ``"same_lower"``
                   (and, where that crop starts at 0, also to PyTorch's rule:
                   numeric padding + ``output_size``)
=================  ==========================================================
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx.backend.test.case.node")

from onnx import helper  # noqa: E402

import tconv  # noqa: E402

# Published cases tconv cannot express, with the reason. Empty: all are mapped.
SKIPPED: dict[str, str] = {}


def _published_cases(op_types=("ConvTranspose", "Conv")):
    """The published node cases of ``op_types``, as ``{name: TestCase}``.

    ``collect_testcases`` imports the module of every ONNX operator (about
    6 s). The cases of one operator are recorded by importing that
    operator's module alone, so that is done when the installed onnx is laid
    out as expected; otherwise the public call is used.
    """
    node = importlib.import_module("onnx.backend.test.case.node")
    found = []
    if hasattr(node, "_NodeTestCases") and getattr(node, "_TargetOpType", None) in (None, *op_types):
        for module in ("convtranspose", "conv"):
            importlib.import_module(f"onnx.backend.test.case.node.{module}")
        found = list(node._NodeTestCases)
    if not any(c.model.graph.node[0].op_type == "ConvTranspose" for c in found):
        found = node.collect_testcases("ConvTranspose") + node.collect_testcases("Conv")
    return {
        c.name: c for c in found
        if c.model is not None and c.data_sets and c.model.graph.node[0].op_type in op_types
    }


CASES = _published_cases()
TRANSPOSE_NAMES = sorted(n for n, c in CASES.items() if c.model.graph.node[0].op_type == "ConvTranspose")
CONV_NAMES = sorted(n for n, c in CASES.items() if c.model.graph.node[0].op_type == "Conv")


class Unmapped(Exception):
    """An ONNX attribute with no tconv spelling."""


def onnx_crop_begin(node_attrs, x_shape, w_shape) -> list[int]:
    """Where ONNX's ``output_shape`` rule starts its crop (NOTSET/SAME_LOWER split)."""
    nd = len(x_shape) - 2
    strides = node_attrs.get("strides", [1] * nd)
    dilations = node_attrs.get("dilations", [1] * nd)
    out_pad = node_attrs.get("output_padding", [0] * nd)
    totals = [s * (i - 1) + op + d * (k - 1) + 1 - o
              for s, i, op, d, k, o in zip(strides, x_shape[2:], out_pad, dilations, w_shape[2:],
                                           node_attrs["output_shape"])]
    return [t - t // 2 for t in totals]


def tconv_arguments(node, x_shape, w_shape, *, output_shape_rule: str = "onnx") -> dict:
    """The tconv keyword arguments that say what ``node`` says."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nd = len(x_shape) - 2
    kwargs = {}
    for onnx_name, tconv_name in (("strides", "stride"), ("dilations", "dilation"), ("group", "groups"),
                                  ("output_padding", "output_padding")):
        if onnx_name in attrs:
            kwargs[tconv_name] = tuple(attrs.pop(onnx_name)) if onnx_name != "group" else attrs.pop(onnx_name)
    if "kernel_shape" in attrs:
        assert tuple(attrs.pop("kernel_shape")) == tuple(w_shape[2:]), "kernel_shape disagrees with W"
    auto_pad = attrs.pop("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = attrs.pop("pads", None)
    if pads is not None:
        if auto_pad != "NOTSET":
            raise Unmapped("pads together with auto_pad")
        kwargs["padding"] = tuple((pads[i], pads[i + nd]) for i in range(nd))
    elif auto_pad != "NOTSET":
        kwargs["padding"] = {"SAME_UPPER": "same", "SAME_LOWER": "same_lower", "VALID": "valid"}[auto_pad]
    if "output_shape" in attrs:
        if pads is not None:
            raise Unmapped("output_shape together with pads")
        output_shape = tuple(attrs.pop("output_shape"))
        kwargs["output_size"] = output_shape
        if auto_pad == "NOTSET":
            if output_shape_rule == "onnx":
                kwargs["padding"] = "same_lower"  # ONNX's "else" branch of the output_shape rule
            else:  # PyTorch's rule: padding stays 0 and output_padding is chosen from the size
                kwargs.pop("output_padding", None)
    if attrs:
        raise Unmapped(f"attributes with no tconv mapping: {sorted(attrs)}")
    return kwargs


def run_case(case, backend, dtype, **mapping):
    node = case.model.graph.node[0]
    inputs, outputs = case.data_sets[0]
    names = [i.name for i in case.model.graph.input]
    arrays = dict(zip(names, inputs))
    x, w = arrays[node.input[0]], arrays[node.input[1]]
    b = arrays[node.input[2]] if len(node.input) > 2 and node.input[2] else None
    nd = x.ndim - 2
    kind = "conv_transpose" if node.op_type == "ConvTranspose" else "conv"
    fn = getattr(tconv, f"{kind}{nd}d")
    kwargs = tconv_arguments(node, x.shape, w.shape, **mapping)
    cast = (lambda a: None if a is None else a.astype(dtype))  # noqa: E731
    got = fn(cast(x), cast(w), cast(b), **kwargs, backend=backend)
    return got, outputs[0]


def test_every_published_conv_transpose_case_is_mapped_or_skipped():
    assert len(TRANSPOSE_NAMES) >= 11, f"fewer published cases than onnx 1.15 ships: {TRANSPOSE_NAMES}"
    unknown_skips = set(SKIPPED) - set(TRANSPOSE_NAMES)
    assert not unknown_skips, f"SKIPPED lists cases onnx no longer publishes: {unknown_skips}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", TRANSPOSE_NAMES)
def test_published_conv_transpose_case(backend_name, assert_close, name, dtype):
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    got, expected = run_case(CASES[name], backend_name, dtype)
    assert got.dtype == dtype
    assert got.shape == expected.shape
    # the published outputs are float32: compare to float32's accuracy
    assert_close(got, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "name", [n for n in TRANSPOSE_NAMES
             if any(a.name == "output_shape" for a in CASES[n].model.graph.node[0].attribute)]
)
def test_published_output_shape_case_with_pytorch_rule(backend_name, assert_close, name):
    # where ONNX's crop starts at 0, output_shape is also PyTorch's output_size
    case = CASES[name]
    node = case.model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, w = case.data_sets[0][0][:2]
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or any(onnx_crop_begin(attrs, x.shape, w.shape)):
        pytest.skip("ONNX crops at the start here: PyTorch's output_size rule gives another result")
    got, expected = run_case(case, backend_name, np.float64, output_shape_rule="pytorch")
    assert_close(got, expected, rtol=1e-5)


@pytest.mark.parametrize("name", CONV_NAMES)
def test_published_conv_case(backend_name, assert_close, name):
    got, expected = run_case(CASES[name], backend_name, np.float64)
    assert got.shape == expected.shape
    assert_close(got, expected, rtol=1e-5)
