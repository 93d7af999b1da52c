#!/usr/bin/env python
"""Malformed-input fuzzer for tconv's public API (issue 7).

Every case starts from a valid call of one public entry point (the 12
functions, a layer's construction + forward + backward, or a ``tconv.shape``
function) and applies zero to three mutations to its arguments, drawn from:
wrong ndim, zero sizes, negative and huge values, wrong channel counts,
negative-stride / zero-stride / Fortran / strided / read-only views, NaN and
Inf, every wrong dtype (object, str, complex, datetime, structured, long
double), nested lists, ragged lists, scalars, bools and floats where ints go,
strings, None, and unknown backends.

Each mutation says what the call must then do:

* ``same``: a benign change of form (a list for an array, an int dtype, a
  view, NaN values, a numpy int for an int...). The call must succeed with
  the shape computed by this file from SPEC's formulas, and on a backend
  other than numpy agree with the numpy backend on the same arguments;
* ``error``: the call must raise ValueError, TypeError or MemoryError whose
  message names the mutated argument;
* ``maybe``: the same values in a form SPEC neither promises nor forbids (a
  NumPy int array for per-dim ints, a memoryview, np.matrix...): either the
  ``same`` result, or an error as for ``error``;
* ``any``: either (a legal but extreme value, say): a result must have a
  sane shape and agree with the numpy backend, an error must be one of the
  three types and name an argument.

Anything else is a failure: another exception type, an unnamed argument, a
wrong shape, a result for an invalid call, a mismatch between backends. A
crash (signal, abort) or a hang kills only a worker process: the supervisor
counts it, records the case, and restarts the worker after it.

Cases are numbered; case ``i`` of seed ``s`` is always the same call, so any
finding is reproduced with ``python tests/fuzz_malformed.py --seed s --case i``.

    python tests/fuzz_malformed.py --cases 2000            # all CPU backends
    python tests/fuzz_malformed.py --cases 20000 --backends blas --json

Workers run with an address-space limit (``--mem-limit-mib``, default 6144;
0 disables it, as needed under AddressSanitizer), so that a legal but huge
request fails fast with MemoryError instead of exhausting the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_EXTENT = 2**40  # an implementation limit of tconv: extents past it are refused up front
NEEDS_ALL = ("input", "weight", "bias")
ALLOWED = (ValueError, TypeError, MemoryError)

# How an error message may name each argument (word-bounded, case-insensitive).
NAMES = {
    "x": [r"\bx\b", r"\binput\b"],
    "weight": [r"\bweight\b", r"\bkernel"],
    "bias": [r"\bbias\b"],
    "grad_output": [r"\bgrad_output\b"],
    "stride": [r"\bstride\b"],
    "padding": [r"\bpadding\b", r"\bpads?\b"],
    "output_padding": [r"\boutput_padding\b"],
    "dilation": [r"\bdilation\b"],
    "groups": [r"\bgroups\b"],
    "output_size": [r"\boutput_size\b", r"\boutput size\b"],
    "needs": [r"\bneeds\b"],
    "backend": [r"\bbackend\b"],
    "in_channels": [r"\bin_channels\b"],
    "out_channels": [r"\bout_channels\b"],
    "kernel_size": [r"\bkernel_size\b", r"\bkernel\b"],
    "dtype": [r"\bdtype\b"],
    "rng": [r"\brng\b"],
    "input_size": [r"\binput_size\b", r"\binput size\b"],
}


class Opaque:
    """An object of no numeric kind at all."""

    def __repr__(self):
        return "Opaque()"


# --------------------------------------------------------------------------- #
# a case: a call, what it must do, and how it was made
# --------------------------------------------------------------------------- #
@dataclass
class Case:
    index: int
    family: str  # "forward", "backward", "layer", "shape"
    target: str  # function or class name
    backend: str
    kwargs: dict
    errors: set = field(default_factory=set)  # arguments made invalid
    anys: set = field(default_factory=set)  # arguments made legal-but-unusual (or of unknown validity)
    maybes: set = field(default_factory=set)  # same values in a form SPEC leaves open: same result or named error
    also_named: set = field(default_factory=set)  # other arguments an error may fairly name
    notes: list = field(default_factory=list)  # the mutations, for the report
    predicted: object = None  # the result's shape(s) for "same"
    compare: object = True  # cross-check the values against the numpy backend (True, False or "nan")

    def mutate(self, arg: str, expect: str, note: str) -> None:
        self.notes.append(f"{arg}: {note} [{expect}]")
        if expect == "error":
            self.errors.add(arg)
        elif expect == "any":
            self.anys.add(arg)
        elif expect == "maybe":
            self.maybes.add(arg)

    @property
    def expect(self) -> str:
        return "error" if self.errors else "any" if self.anys else "maybe" if self.maybes else "same"

    @property
    def blamed(self) -> set:
        return self.errors | self.anys | self.maybes | self.also_named

    def describe(self) -> str:
        return f"case {self.index}: {self.target} on {self.backend} [{self.expect}] " + (
            "; ".join(self.notes) or "valid call")


# --------------------------------------------------------------------------- #
# valid starting points (sizes from SPEC's formulas)
# --------------------------------------------------------------------------- #
def _per_dim(rng, nd, lo, hi):
    return tuple(int(v) for v in rng.integers(lo, hi + 1, nd))


def transposed_size(i, k, s, pb, pe, op, d):
    return (i - 1) * s - pb - pe + d * (k - 1) + op + 1


def regular_size(i, k, s, pb, pe, d):
    return (i + pb + pe - d * (k - 1) - 1) // s + 1


@dataclass
class Geometry:
    transposed: bool
    nd: int
    batch: int | None
    groups: int
    c_in: int
    c_out: int
    in_size: tuple
    kernel: tuple
    stride: tuple
    dilation: tuple
    pad: tuple  # symmetric
    output_padding: tuple
    dtype: str

    @property
    def out_size(self):
        if self.transposed:
            return tuple(transposed_size(*a) for a in zip(self.in_size, self.kernel, self.stride, self.pad, self.pad,
                                                           self.output_padding, self.dilation))
        return tuple(regular_size(*a) for a in zip(self.in_size, self.kernel, self.stride, self.pad, self.pad,
                                                   self.dilation))

    def lead(self):
        return () if self.batch is None else (self.batch,)

    @property
    def x_shape(self):
        return (*self.lead(), self.c_in, *self.in_size)

    @property
    def weight_shape(self):
        if self.transposed:
            return (self.c_in, self.c_out // self.groups, *self.kernel)
        return (self.c_out, self.c_in // self.groups, *self.kernel)

    @property
    def out_shape(self):
        return (*self.lead(), self.c_out, *self.out_size)


def random_geometry(rng, transposed, nd=None) -> Geometry:
    nd = nd or int(rng.integers(1, 4))
    groups = int(rng.choice([1, 1, 2, 3]))
    while True:
        g = Geometry(
            transposed=transposed, nd=nd, batch=[None, 0, 1, 2][int(rng.integers(0, 4)) if rng.random() < 0.9 else 1],
            groups=groups, c_in=groups * int(rng.integers(1, 3)), c_out=groups * int(rng.integers(1, 3)),
            in_size=_per_dim(rng, nd, 1, {1: 9, 2: 6, 3: 4}[nd]), kernel=_per_dim(rng, nd, 1, 3),
            stride=_per_dim(rng, nd, 1, 3), dilation=_per_dim(rng, nd, 1, 2), pad=_per_dim(rng, nd, 0, 1),
            output_padding=(0,) * nd, dtype=str(rng.choice(["float32", "float64"])),
        )
        if transposed:
            g.output_padding = tuple(int(rng.integers(0, max(s, d))) for s, d in zip(g.stride, g.dilation))
        if min(g.out_size) >= 1:
            return g


# --------------------------------------------------------------------------- #
# mutations of arrays
# --------------------------------------------------------------------------- #
def array_mutation(rng, a: np.ndarray, arg: str, case: Case, fatal_axes=()):
    """A mutated stand-in for the valid array ``a``; records what the call must do."""
    kind = int(rng.integers(0, 34))
    if kind == 0:
        case.mutate(arg, "same", "nested list")
        return a.tolist() if a.size else a
    if kind == 1:
        case.mutate(arg, "same", "Fortran order")
        return np.asfortranarray(a)
    if kind == 2:
        case.mutate(arg, "same", "negative strides in every axis")
        return np.flip(np.flip(a).copy())
    if kind == 3:
        case.mutate(arg, "same", "strided view of a bigger buffer")
        big = np.zeros(a.shape[:-1] + (3 * a.shape[-1],), a.dtype) if a.ndim else a.copy()
        if a.ndim:
            big[..., ::3] = a
            return big[..., ::3]
        return big
    if kind == 4:
        case.mutate(arg, "same", "read-only")
        b = a.copy()
        b.setflags(write=False)
        return b
    if kind == 5 and a.ndim:
        case.mutate(arg, "same", "zero-stride broadcast view")
        return np.broadcast_to(a[..., :1], a.shape)
    if kind == 6:
        dt = rng.choice(["int64", "int32", "int8", "uint8", "bool", "float16"])
        case.mutate(arg, "same", f"dtype {dt}")
        return (a > 0) if dt == "bool" else np.clip(a * 3, -100, 100).astype(dt)
    if kind == 7 and a.size:
        case.mutate(arg, "same", "NaN and Inf values")
        b = a.copy()
        flat = b.reshape(-1)
        for v in (np.nan, np.inf, -np.inf):
            flat[int(rng.integers(0, flat.size))] = v
        case.compare = "nan"
        return b
    if kind == 8 and a.size and a.dtype.kind == "f":
        case.mutate(arg, "same", "huge finite values")
        case.compare = False  # overflow to Inf depends on the order of the sums
        return a * np.finfo(a.dtype).max
    if kind == 9:
        case.mutate(arg, "same", "big-endian dtype")
        return a.astype(a.dtype.newbyteorder(">"))
    if kind == 10:
        case.mutate(arg, "error", "object array")
        return a.astype(object)
    if kind == 11:
        case.mutate(arg, "error", "string array")
        return a.astype(str)
    if kind == 12:
        case.mutate(arg, "error", "complex array")
        return a.astype(np.complex128)
    if kind == 13:
        case.mutate(arg, "error", "datetime64 array")
        return np.zeros(a.shape, "datetime64[s]")
    if kind == 14:
        case.mutate(arg, "error", "structured dtype")
        return np.zeros(a.shape, [("f", "f8")])
    if kind == 15 and np.dtype(np.longdouble).itemsize > 8:
        case.mutate(arg, "error", "long double")
        return a.astype(np.longdouble)
    if kind == 16:
        case.mutate(arg, "error", "axes too many")
        return a[None, None] if arg == "x" else a[None]
    if kind == 17 and a.ndim > 1 and a.shape[0] and a.shape[1]:
        case.mutate(arg, "error", "axes too few")
        return a[0] if arg != "x" else a[0, 0]
    if kind == 18 and a.ndim:
        axis = int(rng.integers(0, a.ndim))
        shape = list(a.shape)
        shape[axis] += 1
        # a bigger batch, spatial size or output-channel count may be legal (with another
        # output shape); an input-channel count that the other arrays contradict is not
        fatal = arg in ("bias", "grad_output") or axis in fatal_axes
        case.mutate(arg, "error" if fatal else "any", f"size of axis {axis} off by one")
        return np.ones(shape, a.dtype)
    if kind == 19 and a.ndim:
        axis = int(rng.integers(0, a.ndim))
        shape = list(a.shape)
        shape[axis] = 0
        case.mutate(arg, "any", f"zero size in axis {axis}")
        return np.zeros(shape, a.dtype)
    if kind == 20:
        value = [1.5, np.float64(2.0), np.array(1.0), True, 0, -1][int(rng.integers(0, 6))]
        case.mutate(arg, "error", f"scalar {value!r}")
        return value
    if kind == 21:
        case.mutate(arg, "error" if arg != "bias" else "same", "None")
        if arg == "bias":
            case.compare = False
        return None
    if kind == 22:
        value = ["abc", "", b"\x00\x01", "1.0"][int(rng.integers(0, 4))]
        case.mutate(arg, "error", f"string {value!r}")
        return value
    if kind == 23:
        case.mutate(arg, "error", "ragged nested list")
        return [[1.0, 2.0], [3.0]]
    if kind == 24:
        case.mutate(arg, "error", "list holding None")
        lst = a.tolist() if a.size else [None]
        cur = lst
        while isinstance(cur, list) and cur and isinstance(cur[0], list):
            cur = cur[0]
        if isinstance(cur, list) and cur:
            cur[0] = None
        else:
            lst = [None]
        return lst
    if kind == 25:
        value = [{}, {"a": 1}, Opaque(), set(), (lambda: 0)][int(rng.integers(0, 5))]
        case.mutate(arg, "error", f"a {type(value).__name__}")
        return value
    if kind == 26:
        # logically huge, physically tiny: a contiguous copy cannot be allocated
        shape = list(a.shape) if a.ndim else [1]
        shape[-1] = 2**39
        case.mutate(arg, "any", "zero-stride view of 2**39 cells in the last axis")
        return np.broadcast_to(np.ones((), a.dtype), tuple(shape))
    if kind == 27:
        case.mutate(arg, "maybe" if a.ndim == 2 else "error", "np.matrix" if a.ndim == 2 else "0-d array")
        return np.asmatrix(a) if a.ndim == 2 else np.array(1.0)
    if kind == 28:
        case.mutate(arg, "maybe", "masked array")
        case.compare = False
        return np.ma.masked_array(a, mask=np.zeros(a.shape, bool))
    if kind == 29:
        case.mutate(arg, "same", "tuple of tuples")

        def tup(v):
            return tuple(tup(u) for u in v) if isinstance(v, list) else v

        return tup(a.tolist()) if a.size else a
    if kind == 30:
        case.mutate(arg, "maybe", "memoryview")
        return memoryview(np.ascontiguousarray(a)) if a.size else a
    if kind == 31:
        case.mutate(arg, "same", "a float array subclass")

        class Sub(np.ndarray):
            pass

        return a.view(Sub)
    if kind == 32:
        case.mutate(arg, "error", "float128-like Python objects (Fraction) in a list")
        from fractions import Fraction

        return [Fraction(1, 3)] * (a.shape[0] if a.ndim else 1)
    return a


# --------------------------------------------------------------------------- #
# mutations of int / per-dim arguments
# --------------------------------------------------------------------------- #
def int_representation(rng, values: tuple, arg: str, case: Case, nd: int):
    """``values`` (a valid per-dim tuple) in another form, valid or not."""
    v = values[0] if len(set(values)) == 1 else None
    kind = int(rng.integers(0, 26))
    if kind == 0 and v is not None:
        case.mutate(arg, "same", f"numpy int {v}")
        return np.int64(v)
    if kind == 1 and v is not None:
        case.mutate(arg, "same", f"np.int8({v})")
        return np.int8(v)
    if kind == 2:
        case.mutate(arg, "same", "list")
        return list(values)
    if kind == 3:
        case.mutate(arg, "maybe", "numpy int array")
        return np.array(values)
    if kind == 4 and v is not None:
        case.mutate(arg, "maybe", "0-d int array")
        return np.array(v)
    if kind == 5:
        case.mutate(arg, "error", "floats")
        return tuple(float(u) for u in values) if rng.random() < 0.5 else float(values[0])
    if kind == 6:
        case.mutate(arg, "error", "bool")
        return bool(rng.random() < 0.5)
    if kind == 7:
        case.mutate(arg, "error", "np.bool_")
        return np.bool_(True)
    if kind == 8:
        case.mutate(arg, "error", "bools per dim")
        return (True,) * nd
    if kind == 9:
        case.mutate(arg, "error", "None")
        return None
    if kind == 10:
        value = [str(values[0]), "", "same" if arg != "padding" else "1", b"1"][int(rng.integers(0, 4))]
        case.mutate(arg, "error", f"string {value!r}")
        return value
    if kind == 11:  # as output_size, nd + 1 ints are the full shape (C, *spatial)
        case.mutate(arg, "error" if arg != "output_size" else "any", "one int too many")
        return (*values, values[0])
    if kind == 12 and nd > 1:
        case.mutate(arg, "error", "one int too few")
        return values[:-1]
    if kind == 13:
        case.mutate(arg, "error", "empty tuple")
        return ()
    if kind == 14:
        case.mutate(arg, "error", "nested tuples")
        return tuple((u,) for u in values)
    if kind == 15:
        value = [float("nan"), float("inf"), -float("inf")][int(rng.integers(0, 3))]
        case.mutate(arg, "error", f"float {value}")
        return value
    if kind == 16:
        case.mutate(arg, "error", "complex")
        return complex(values[0], 0)
    if kind == 17:
        value = [Opaque(), {}, {1: 2}, object()][int(rng.integers(0, 4))]
        case.mutate(arg, "error", f"a {type(value).__name__}")
        return value
    if kind == 18:
        case.mutate(arg, "error", "np.float64")
        return np.float64(values[0])
    if kind == 19:
        case.mutate(arg, "error" if arg != "output_size" else "any", "int array of the wrong length")
        return np.array((*values, 1))
    if kind == 20:
        case.mutate(arg, "error", "2-D int array")
        return np.array([values])
    if kind == 21:
        from fractions import Fraction

        case.mutate(arg, "error", "Fraction")
        return Fraction(values[0])
    if kind == 22:
        case.mutate(arg, "any", "a generator")
        case.compare = False  # the first call consumes it
        return (u for u in values)  # an iterator: tconv may take it or not
    return values


HUGE = [2**40, 2**40 + 1, 2**62, 2**63, 2**64, 10**30]
NEGATIVE = [-1, -2, -(2**63), -(2**64)]


def int_value_mutation(rng, arg: str, case: Case, nd: int, minimum: int, bounded: bool = True):
    """A new value for a per-dim argument: zero, negative or huge in one dim.

    ``bounded``: whether tconv refuses values past ``MAX_EXTENT`` (calls that
    allocate do; the pure shape arithmetic need not).
    """
    r = rng.random()
    if r < 0.35:
        value = int(rng.choice([0] if minimum == 1 else [-1]))
        if minimum == 0:
            value = -1
        case.mutate(arg, "error", f"{value} (below {minimum})")
    elif r < 0.6:
        value = int(NEGATIVE[int(rng.integers(0, len(NEGATIVE)))])
        case.mutate(arg, "error", f"negative {value}")
    else:
        value = int(HUGE[int(rng.integers(0, len(HUGE)))])
        case.mutate(arg, "any" if value <= MAX_EXTENT or not bounded else "error", f"huge {value}")
    if rng.random() < 0.5 or nd == 1:
        return value
    dims = [1] * nd
    dims[int(rng.integers(0, nd))] = value
    return tuple(dims)


def padding_mutation(rng, case: Case, nd: int, pad: tuple):
    kind = int(rng.integers(0, 17))
    if kind == 0:
        case.mutate("padding", "same", "(begin, end) pairs")
        return tuple((p, p) for p in pad)
    if kind == 1:
        case.mutate("padding", "same", "pairs as lists")
        return [[p, p] for p in pad]
    if kind == 2:
        mode = ["valid", "same", "same_lower", "SAME", "Valid"][int(rng.integers(0, 5))]
        case.mutate("padding", "any", f"mode {mode!r}")
        return mode
    if kind == 3:
        value = ["same_upper", "bogus", "", "SAME_UPPER", "full", " same"][int(rng.integers(0, 6))]
        case.mutate("padding", "error", f"unknown mode {value!r}")
        return value
    if kind == 4:
        case.mutate("padding", "error", "negative pair entry")
        return tuple((p, -1) for p in pad)
    if kind == 5:
        case.mutate("padding", "error", "triples")
        return tuple((p, p, p) for p in pad)
    if kind == 6:
        case.mutate("padding", "error", "float pairs")
        return tuple((float(p), float(p)) for p in pad)
    if kind == 7:
        case.mutate("padding", "error", "mixed pairs and ints") if nd > 1 else case.mutate(
            "padding", "error", "one int too many")
        return ((pad[0], pad[0]),) + tuple(pad[1:]) if nd > 1 else (pad[0], pad[0])
    if kind == 8:
        case.mutate("padding", "any", "(begin, end) pairs, asymmetric")
        return tuple((p, int(rng.integers(0, 3))) for p in pad)
    if kind == 9:
        case.mutate("padding", "maybe", "numpy (nd, 2) array")
        return np.array([[p, p] for p in pad])
    if kind == 10:
        case.mutate("padding", "error", "pairs of bools")
        return tuple((True, False) for _ in pad)
    if kind == 11:
        case.mutate("padding", "error", "huge pair")
        return tuple((p, 2**63) for p in pad)
    if kind == 12:
        case.mutate("padding", "any", "padding 2**40")
        return 2**40
    if kind == 13:
        case.mutate("padding", "any", "large padding (output may vanish)")
        return int(rng.integers(2, 12))
    return int_representation(rng, pad, "padding", case, nd) if kind == 14 else int_value_mutation(
        rng, "padding", case, nd, 0)


# --------------------------------------------------------------------------- #
# building cases
# --------------------------------------------------------------------------- #
def make_case(seed: int, index: int, backends: list[str]) -> Case:
    rng = np.random.default_rng([seed, index])
    backend = backends[index % len(backends)]
    family = rng.choice(["forward", "forward", "backward", "backward", "layer", "shape"])
    if family == "shape":
        return shape_case(rng, index, backend)
    if family == "layer":
        return layer_case(rng, index, backend)
    return function_case(rng, index, backend, family == "backward")


def fatal_axes(g: Geometry, arg: str) -> tuple:
    """Axes of ``arg`` whose size the other arrays fix (a change is an error)."""
    if arg == "x":
        return (0 if g.batch is None else 1,)
    if arg == "weight":
        return (0,) if g.transposed else (1,)
    return ()


def function_case(rng, index, backend, backward) -> Case:
    transposed = bool(rng.random() < 0.6)
    g = random_geometry(rng, transposed)
    dt = np.dtype(g.dtype)
    x = rng.standard_normal(g.x_shape).astype(dt)
    w = rng.standard_normal(g.weight_shape).astype(dt)
    name = ("conv_transpose" if transposed else "conv") + f"{g.nd}d" + ("_backward" if backward else "")
    kwargs = dict(x=x, weight=w, stride=g.stride, padding=g.pad, dilation=g.dilation, groups=g.groups)
    if transposed:
        kwargs["output_padding"] = g.output_padding
    if backward:
        kwargs["grad_output"] = rng.standard_normal(g.out_shape).astype(dt)
        needs = NEEDS_ALL
        kwargs["needs"] = needs
    elif rng.random() < 0.6:
        kwargs["bias"] = rng.standard_normal(g.c_out).astype(dt)
    case = Case(index, "backward" if backward else "forward", name, backend, kwargs)
    case.also_named.add("backend")  # "the blas backend cannot ...": a capability limit, named by backend
    if backward:  # any change of the forward output's shape is fairly blamed on grad_output
        case.also_named.add("grad_output")
    # simpler forms of the valid arguments
    for arg in ("stride", "dilation", "padding", "output_padding"):
        if arg in kwargs and len(set(kwargs[arg])) == 1 and rng.random() < 0.5:
            kwargs[arg] = kwargs[arg][0]
    if transposed and not backward and rng.random() < 0.15 and all(o < s for o, s in zip(g.output_padding, g.stride)):
        kwargs.pop("output_padding")
        kwargs["output_size"] = g.out_size if rng.random() < 0.7 else g.out_shape
        case.notes.append("output_size instead of output_padding")
    predicted_out = g.out_shape

    n_mutations = int(rng.choice([0, 1, 1, 1, 2, 3]))
    for arg in rng.choice(["x", "weight", "bias", "grad_output", "stride", "padding", "output_padding",
                           "dilation", "groups", "output_size", "needs", "backend"], n_mutations, replace=False):
        arg = str(arg)  # each argument is mutated at most once
        if arg in ("x", "weight", "grad_output", "bias"):
            if arg not in kwargs or kwargs[arg] is None or not isinstance(kwargs[arg], np.ndarray):
                continue
            kwargs[arg] = array_mutation(rng, kwargs[arg], arg, case, fatal_axes(g, arg))
            case.also_named |= {"x", "weight", "bias", "groups"} | ({"grad_output"} if backward else set())
        elif arg in ("stride", "dilation"):
            if rng.random() < 0.5:
                kwargs[arg] = int_representation(rng, getattr(g, arg), arg, case, g.nd)
            else:
                kwargs[arg] = int_value_mutation(rng, arg, case, g.nd, 1)
        elif arg == "output_padding" and transposed and "output_padding" in kwargs:
            r = rng.random()
            if r < 0.4:
                kwargs[arg] = int_representation(rng, g.output_padding, arg, case, g.nd)
            elif r < 0.7:
                bad = tuple(max(s, d) for s, d in zip(g.stride, g.dilation))
                kwargs[arg] = bad
                case.mutate(arg, "error", f"{bad} not below stride {g.stride} or dilation {g.dilation}")
            else:
                kwargs[arg] = int_value_mutation(rng, arg, case, g.nd, 0)
        elif arg == "padding":
            kwargs[arg] = padding_mutation(rng, case, g.nd, g.pad)
        elif arg == "groups":
            r = rng.random()
            if r < 0.3:
                value = [0, -1, -(2**63), 2**63][int(rng.integers(0, 4))]
                case.mutate(arg, "error", f"{value}")
            elif r < 0.5:
                value = g.groups * 7 + 1  # divides neither channel count
                case.mutate(arg, "error", f"{value}, not a divisor")
            elif r < 0.6:
                value = np.int32(g.groups)
                case.mutate(arg, "same", "np.int32")
            else:
                value = int_representation(rng, (g.groups,), arg, case, 1)
                if isinstance(value, (tuple, list, np.ndarray)) and len(np.atleast_1d(value)) == 1:
                    case.mutate(arg, "any", "a one-element sequence")
            kwargs[arg] = value
        elif arg == "output_size" and transposed and not backward:
            kwargs.pop("output_padding", None)
            case.errors.discard("output_padding")  # no longer passed: nothing to refuse
            r = rng.random()
            reachable = all(o < s for o, s in zip(g.output_padding, g.stride))
            if r < 0.25 and reachable:
                kwargs[arg] = list(g.out_size)
                case.mutate(arg, "same", "output_size as a list (replaces output_padding)")
            elif r < 0.5:
                wanted = tuple(o + s for o, s in zip(g.out_size, g.stride))  # one stride too far
                kwargs[arg] = wanted
                padding_changed = isinstance(kwargs.get("padding"), str) or "padding" in case.blamed
                case.mutate(arg, "any" if padding_changed else "error", f"unreachable {wanted}")
            elif r < 0.6:
                kwargs[arg] = (0,) * g.nd
                case.mutate(arg, "error", "zeros")
            elif r < 0.7:
                kwargs[arg] = (2**63,) * g.nd
                case.mutate(arg, "error", "2**63")
            elif r < 0.8:
                kwargs[arg] = (1,) * (g.nd + 3)
                case.mutate(arg, "error", "too many sizes")
            else:
                kwargs[arg] = int_representation(rng, g.out_size, arg, case, g.nd)
                if kwargs[arg] is None:  # output_size=None is the default, not an error
                    case.errors.discard(arg)
                    case.mutate(arg, "any", "None is the default")
                elif not reachable:
                    case.mutate(arg, "any", "output size needing output_padding >= stride")
        elif arg == "needs" and backward:
            choice = int(rng.integers(0, 9))
            value = [("input",), "weight", [], ("bias", "input"), ("bogus",), None, 5, ("input", 1),
                     ("input", "input")][choice]
            kwargs[arg] = value
            if choice in (0, 1, 2, 3, 8):
                case.mutate(arg, "same", f"needs={value!r}")
            else:
                case.mutate(arg, "error", f"needs={value!r}")
        elif arg == "backend":
            value = ["no-such-backend", "", 5, "cupy", b"numpy", "NUMPY"][int(rng.integers(0, 6))]
            case.backend = value
            case.mutate(arg, "any" if value == "cupy" else "error", f"backend={value!r}")
            # "cupy" is legal where a GPU is; elsewhere it must be a BackendError (a ValueError)
            case.compare = False

    if isinstance(kwargs.get("padding"), str) and "output_size" in kwargs:
        case.errors.discard("output_size")  # ONNX output_shape: any size is legal
        case.anys.add("output_size")
    if backward:
        needs = kwargs.get("needs")
        shapes = (g.x_shape, g.weight_shape, (g.c_out,))
        if isinstance(needs, str):
            needs = (needs,)
        try:
            want = set(needs)
        except TypeError:
            want = set()
        case.predicted = tuple(s if n in want else None for n, s in zip(NEEDS_ALL, shapes))
    else:
        case.predicted = predicted_out
    return case


def layer_case(rng, index, backend) -> Case:
    transposed = bool(rng.random() < 0.6)
    g = random_geometry(rng, transposed)
    cls = ("ConvTranspose" if transposed else "Conv") + f"{g.nd}d"
    ctor = dict(in_channels=g.c_in, out_channels=g.c_out, kernel_size=g.kernel, stride=g.stride, padding=g.pad,
                groups=g.groups, bias=bool(rng.random() < 0.7), dilation=g.dilation, dtype=np.dtype(g.dtype),
                rng=int(rng.integers(0, 100)))
    if transposed:
        ctor["output_padding"] = g.output_padding
    case = Case(index, "layer", cls, backend, dict(ctor=ctor))
    case.also_named |= {"grad_output", "backend"}  # backward gets a grad_output of the unmutated layer's shape
    x = rng.standard_normal(g.x_shape).astype(g.dtype)
    dy = rng.standard_normal(g.out_shape).astype(g.dtype)
    n_mutations = int(rng.choice([0, 1, 1, 2]))
    for arg in rng.choice(["in_channels", "out_channels", "kernel_size", "stride", "padding", "groups",
                           "dilation", "dtype", "rng", "x", "grad_output", "bias"], n_mutations, replace=False):
        arg = str(arg)
        if arg in ("in_channels", "out_channels", "groups"):
            r = rng.random()
            if r < 0.4:
                value = [0, -1, -(2**63)][int(rng.integers(0, 3))]
                case.mutate(arg, "error", f"{value}")
            elif r < 0.6:
                value = [1.0 * ctor[arg], True, str(ctor[arg]), None, (ctor[arg],)][int(rng.integers(0, 5))]
                case.mutate(arg, "error", f"{value!r}")
            elif r < 0.75:
                value = 2**40 if arg != "groups" else 2**40
                case.mutate(arg, "any", "2**40")
            else:
                value = np.int64(ctor[arg])
                case.mutate(arg, "same", "np.int64")
            ctor[arg] = value
        elif arg == "kernel_size":
            if rng.random() < 0.5:
                ctor[arg] = int_representation(rng, g.kernel, arg, case, g.nd)
            else:
                ctor[arg] = int_value_mutation(rng, arg, case, g.nd, 1)
        elif arg in ("stride", "dilation"):
            ctor[arg] = int_representation(rng, ctor[arg], arg, case, g.nd) if rng.random() < 0.5 else \
                int_value_mutation(rng, arg, case, g.nd, 1)
        elif arg == "padding":
            ctor[arg] = padding_mutation(rng, case, g.nd, g.pad)
        elif arg == "dtype":
            value = [np.float16, "float32", np.int32, "bogus", None, object, np.complex64][int(rng.integers(0, 7))]
            ctor[arg] = value
            if value in (np.float16, "float32"):
                case.mutate(arg, "same", f"dtype={value!r}")
                case.compare = False
            elif value is None:  # np.dtype(None) is float64
                case.mutate(arg, "any", "dtype=None")
            else:
                case.mutate(arg, "error", f"dtype={value!r}")
        elif arg == "rng":
            value = ["seed", -1, 1.5, np.random.default_rng(1), np.random.SeedSequence(3)][int(rng.integers(0, 5))]
            ctor[arg] = value
            case.mutate(arg, "error" if isinstance(value, (str, float)) or value == -1 else "same", f"rng={value!r}")
        elif arg == "bias":
            value = [0, 1, None, "yes"][int(rng.integers(0, 4))]
            ctor[arg] = value
            case.mutate(arg, "any", f"bias={value!r}")
        elif arg == "x":
            x = array_mutation(rng, x, "x", case, fatal_axes(g, "x"))
            case.also_named |= {"grad_output"}
        elif arg == "grad_output":
            dy = array_mutation(rng, dy, "grad_output", case)
    case.kwargs.update(x=x, grad_output=dy)
    case.predicted = (g.out_shape, g.x_shape, g.weight_shape)
    case.compare = False  # layers are thin shells over the functions, compared there
    return case


def shape_case(rng, index, backend) -> Case:
    nd = int(rng.integers(1, 4))
    which = str(rng.choice(["conv_transpose_output_size", "conv_output_size", "output_padding_for"]))
    while True:  # a valid starting point: every size SPEC's formula gives is positive
        g = random_geometry(rng, which != "conv_output_size", nd)
        args = dict(input_size=g.in_size, kernel_size=g.kernel, stride=g.stride, padding=g.pad,
                    dilation=g.dilation)
        if which == "conv_transpose_output_size":
            g.output_padding = args["output_padding"] = tuple(min(o, s - 1) for o, s in zip(g.output_padding, g.stride))
            predicted = g.out_size
        elif which == "conv_output_size":
            predicted = g.out_size
        else:
            g.output_padding = tuple(int(rng.integers(0, s)) for s in g.stride)
            args["output_size"] = g.out_size
            predicted = g.output_padding
        if min(g.out_size) >= 1:
            break
    case = Case(index, "shape", which, "-", args)
    case.compare = False
    if which == "output_padding_for":  # "output_size ... is not reachable" is the right complaint
        case.also_named.add("output_size")
    for arg in rng.choice(list(args), int(rng.choice([0, 1, 1, 2])), replace=False):
        arg = str(arg)
        base = args[arg]
        if arg == "padding":
            args[arg] = padding_mutation(rng, case, nd, g.pad)
        elif rng.random() < 0.5:
            args[arg] = int_representation(rng, tuple(base), arg, case, nd)
        else:
            args[arg] = int_value_mutation(rng, arg, case, nd, 0 if arg in ("input_size", "output_padding") else 1,
                                           bounded=False)
            if arg == "output_size":
                case.mutate(arg, "error", "not reachable")
    case.predicted = tuple(predicted)
    return case


# --------------------------------------------------------------------------- #
# running a case
# --------------------------------------------------------------------------- #
def call(case: Case, backend=None):
    import tconv

    backend = case.backend if backend is None else backend
    kw = dict(case.kwargs)
    if case.family == "shape":
        return getattr(tconv.shape, case.target)(**kw)
    if case.family == "layer":
        layer = getattr(tconv, case.target)(**kw["ctor"])
        out = layer(kw["x"], backend=backend)
        grad_x = layer.backward(kw["grad_output"])
        return out, grad_x, layer.weight_grad, layer
    x = kw.pop("x")
    w = kw.pop("weight")
    fn = getattr(tconv, case.target)
    if case.family == "backward":
        dy = kw.pop("grad_output")
        return fn(dy, x, w, **kw, backend=backend)
    return fn(x, w, kw.pop("bias", None), **kw, backend=backend)


def names_argument(message: str, args) -> bool:
    return any(re.search(p, message, re.IGNORECASE) for a in args for p in NAMES.get(a, [re.escape(a)]))


def _shape(a):
    return None if a is None else tuple(np.shape(a))


def check_result(case: Case, result) -> str | None:
    """None when ``result`` is right for ``case``, else what is wrong."""
    if case.family == "shape":
        if not isinstance(result, tuple) or not all(isinstance(v, int) for v in result):
            return f"returned {result!r}, not a tuple of ints"
        if case.expect in ("same", "maybe") and result != case.predicted:
            return f"returned {result}, SPEC's formula gives {case.predicted}"
        if case.target != "output_padding_for" and min(result, default=1) < 1:
            return f"returned a non-positive size {result}"
        return None
    if case.family == "layer":
        out, grad_x, grad_w, layer = result
        shapes = (_shape(out), _shape(grad_x), _shape(grad_w))
        if case.expect in ("same", "maybe") and shapes != case.predicted:
            return f"layer shapes (out, grad_x, weight_grad) {shapes}, expected {case.predicted}"
        for a in (out, grad_x, grad_w):
            if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
                return f"layer returned {type(a).__name__} {getattr(a, 'dtype', '')}"
        return None
    arrays = result if case.family == "backward" else (result,)
    if case.family == "backward" and (not isinstance(result, tuple) or len(result) != 3):
        return f"backward returned {type(result).__name__}, not a 3-tuple"
    for a in arrays:
        if a is not None and (not isinstance(a, np.ndarray) or a.dtype.kind != "f"
                              or any(s < 0 for s in a.shape)):
            return f"returned {type(a).__name__} {getattr(a, 'dtype', '')} {getattr(a, 'shape', '')}"
    got = tuple(_shape(a) for a in arrays) if case.family == "backward" else _shape(result)
    if case.expect in ("same", "maybe") and got != case.predicted:
        return f"shape {got}, SPEC's formulas give {case.predicted}"
    if case.compare and case.backend != "numpy" and isinstance(case.backend, str):
        try:
            reference = call(case, backend="numpy")
        except Exception as exc:  # noqa: BLE001
            return f"succeeded, but the numpy backend raised {type(exc).__name__}: {exc}"
        refs = reference if case.family == "backward" else (reference,)
        for a, r in zip(arrays, refs):
            if (a is None) != (r is None):
                return "None-ness differs from the numpy backend"
            if a is None:
                continue
            if a.shape != r.shape or a.dtype != r.dtype:
                return f"{a.shape} {a.dtype} vs numpy backend {r.shape} {r.dtype}"
            if case.compare == "nan":
                if not (np.array_equal(np.isnan(a), np.isnan(r)) and np.array_equal(np.isinf(a), np.isinf(r))):
                    return "NaN/Inf cells differ from the numpy backend"
                finite = np.isfinite(r)
                a, r = a[finite], r[finite]
            tol = {2: 5e-3, 4: 1e-4, 8: 1e-10}[a.dtype.itemsize]
            scale = max(1.0, float(np.max(np.abs(r), initial=0)))
            if a.size and float(np.max(np.abs(a.astype(np.float64) - r))) > tol * scale:
                return f"values differ from the numpy backend by {float(np.max(np.abs(a - r))):.3g}"
    return None


def run_case(case: Case) -> tuple[str, str]:
    """(outcome, detail). Outcomes: ok, error:<Type>, and fail:<why>."""
    try:
        result = call(case)
    except ALLOWED as exc:
        message = str(exc)
        kind = f"error:{type(exc).__name__}"
        if case.expect == "same" or (case.expect == "maybe" and isinstance(exc, MemoryError)):
            return "fail:raised on a valid call", f"{type(exc).__name__}: {message}"
        if isinstance(exc, MemoryError):
            return kind, message  # an allocation failure: the message is NumPy's
        named = case.blamed or list(NAMES)
        if not names_argument(message, named):
            return "fail:message names no argument", f"{type(exc).__name__}: {message!r} (blamed: {named})"
        return kind, message
    except RuntimeError as exc:
        return "fail:RuntimeError", str(exc)
    except Exception as exc:  # noqa: BLE001 - every other type is a finding
        return f"fail:{type(exc).__name__}", "".join(traceback.format_exception_only(type(exc), exc)).strip()
    if case.expect == "error":
        return "fail:accepted an invalid call", f"returned {type(result).__name__}"
    problem = check_result(case, result)
    if problem:
        return "fail:wrong result", problem
    return "ok", ""


# --------------------------------------------------------------------------- #
# worker and supervisor
# --------------------------------------------------------------------------- #
def _limit_memory(mib: int) -> None:
    if mib <= 0 or "asan" in os.environ.get("LD_PRELOAD", ""):  # ASan reserves terabytes of shadow memory
        return
    import resource

    with open("/proc/self/status") as f:
        vm = next((int(line.split()[1]) for line in f if line.startswith("VmSize:")), 0) * 1024
    limit = vm + mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker(seed: int, start: int, stop: int, backends: list[str], progress: str, mem_limit_mib: int) -> int:
    """Run cases ``start..stop-1``, logging each to ``progress`` as it starts and ends.

    The log survives a crash: ``B i`` before case ``i``, ``E i<tab>outcome<tab>family``
    after it, ``F {json}`` for a failure. The supervisor reads it back.
    """
    import warnings

    warnings.simplefilter("ignore")
    import tconv  # noqa: F401 - import before the memory limit: libraries map their pools

    tconv.list_backends()
    _limit_memory(mem_limit_mib)
    crash_at = int(os.environ.get("TCONV_FUZZ_SELFTEST_CRASH", "-1"))  # proves that crashes are counted
    with open(progress, "a", buffering=1) as log:
        for i in range(start, stop):
            log.write(f"B {i}\n")
            if i == crash_at:
                import ctypes

                ctypes.string_at(0)  # a segfault, as a buggy kernel would cause
            try:
                case = make_case(seed, i, backends)
            except Exception as exc:  # noqa: BLE001 - a bug of this file, not of tconv
                log.write("F " + json.dumps(dict(case=i, outcome="fail:fuzzer bug", detail=repr(exc)[:500],
                                                 what=f"case {i}")) + "\n")
                log.write(f"E {i}\tfail:fuzzer bug\tnone\n")
                continue
            outcome, detail = run_case(case)
            if outcome.startswith("fail"):
                log.write("F " + json.dumps(dict(case=i, outcome=outcome, detail=detail[:500],
                                                 what=case.describe()[:500])) + "\n")
            log.write(f"E {i}\t{outcome}\t{case.family}\n")
    return 0


def _read_log(path: str):
    """(counts, failures, last case begun but not ended or None, next case) from a worker's log."""
    counts, failures, begun, ended = Counter(), [], None, -1
    with open(path) as f:
        for line in f:
            tag, _, rest = line.rstrip("\n").partition(" ")
            if tag == "B":
                begun = int(rest)
            elif tag == "E":
                i, outcome, family = rest.split("\t")
                counts[outcome] += 1
                counts[f"target:{family}"] += 1
                ended = int(i)
            elif tag == "F":
                failures.append(json.loads(rest))
    unfinished = begun if begun is not None and begun > ended else None
    return counts, failures, unfinished


def supervise(cases: int, seed: int = 0, backends=None, mem_limit_mib: int = 6144, timeout: float = 600,
              chunk: int = 5000, python=sys.executable, env=None) -> dict:
    """Run cases ``0..cases-1`` in worker subprocesses; count crashes and hangs; return a summary.

    A worker that dies (signal, abort, non-zero exit) or hangs past
    ``timeout`` seconds is counted as one crash of the case it was running,
    and a new worker resumes after that case.
    """
    import tempfile

    if backends is None:
        backends = available_backends()
    counts, failures, crashes = Counter(), [], []
    started = time.monotonic()
    i = 0
    with tempfile.TemporaryDirectory(prefix="tconv-fuzz-") as tmp:
        while i < cases:
            stop = min(cases, i + chunk)
            log = os.path.join(tmp, f"worker-{i}.log")
            cmd = [python, os.path.abspath(__file__), "--worker", "--seed", str(seed), "--start", str(i),
                   "--stop", str(stop), "--backends", ",".join(backends), "--mem-limit-mib", str(mem_limit_mib),
                   "--progress", log]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
                rc, err = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired as exc:
                rc, err = "hang", exc.stderr or ""
                err = err.decode(errors="replace") if isinstance(err, bytes) else err
            done, fails, unfinished = _read_log(log) if os.path.exists(log) else (Counter(), [], None)
            counts.update(done)
            failures += fails
            if rc == 0 and unfinished is None:
                i = stop
                continue
            last = unfinished if unfinished is not None else i
            how = "hang" if rc == "hang" else (f"signal {-rc}" if rc < 0 else f"exit status {rc}")
            try:
                what = make_case(seed, last, backends).describe()[:500]
            except Exception as exc:  # noqa: BLE001 - a bug of this file, reported as such
                what = f"case {last}: could not be built: {exc!r}"
            crashes.append(dict(case=last, how=how, what=what, stderr=(err or "")[-3000:]))
            counts["crash"] += 1
            i = last + 1
    ran = sum(v for k, v in counts.items() if not k.startswith("target:"))
    return dict(seed=seed, backends=backends, cases=cases, ran=ran, seconds=round(time.monotonic() - started, 1),
                counts=dict(sorted(counts.items())), failures=failures, crashes=crashes)


def available_backends() -> list[str]:
    import tconv

    return [b.name for b in tconv.list_backends() if b.available and b.name != "cupy"]


def format_summary(s: dict) -> str:
    c = s["counts"]
    results = c.get("ok", 0)
    errors = {k[6:]: v for k, v in c.items() if k.startswith("error:")}
    fails = {k[5:]: v for k, v in c.items() if k.startswith("fail:")}
    targets = {k[7:]: v for k, v in c.items() if k.startswith("target:")}
    lines = [
        f"tconv malformed-input fuzz: seed {s['seed']}, backends {', '.join(s['backends'])}, "
        f"{s['seconds']} s",
        f"  cases run      {s['ran']} of {s['cases']}  (by target: {targets})",
        f"  results        {results}",
        f"  exceptions     {sum(errors.values())}  {errors}",
        f"  failures       {sum(fails.values())}  {fails}",
        f"  crashes        {len(s['crashes'])}",
    ]
    groups: dict = {}
    for f in s["failures"]:  # one line per kind of failure, with its first case
        key = (f["outcome"], re.sub(r"\d+", "N", f["detail"])[:70])
        groups.setdefault(key, []).append(f)
    for (outcome, _), fs in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:25]:
        f = fs[0]
        lines.append(f"    FAIL x{len(fs)} {outcome[5:]}: {f['what'][:160]}\n         -> {f['detail'][:220]}")
    for cr in s["crashes"][:10]:
        lines.append(f"    CRASH ({cr['how']}): {cr['what']}\n         stderr tail: {cr['stderr'][-300:]!r}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="", help="comma-separated (default: every available CPU backend)")
    parser.add_argument("--case", type=int, default=None, help="run one case here, verbosely")
    parser.add_argument("--mem-limit-mib", type=int, default=6144)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per worker before it counts as hung")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--progress", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))  # a source tree: import its tconv
    backends = [b for b in args.backends.split(",") if b] or available_backends()
    if args.worker:
        return worker(args.seed, args.start, args.stop, backends, args.progress, args.mem_limit_mib)
    if args.case is not None:
        case = make_case(args.seed, args.case, backends)
        print(case.describe())
        for k, v in case.kwargs.items():
            print(f"  {k} = {v!r}"[:300] if not isinstance(v, np.ndarray) else
                  f"  {k} = array {v.shape} {v.dtype} strides {v.strides}")
        outcome, detail = run_case(case)
        print(f"-> {outcome}: {detail}")
        return 0 if not outcome.startswith("fail") else 1
    summary = supervise(args.cases, args.seed, backends, args.mem_limit_mib, args.timeout)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0 if not summary["crashes"] and not any(k.startswith("fail:") for k in summary["counts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
