"""The definition of (transposed) convolution, written as plain Python loops.

This is the independent oracle the engine is tested against: it shares no
code with tconv (not even the shape module). SPEC: every input cell scatters
``value * kernel`` onto the output at ``cell * stride - pad_begin + tap *
dilation``; cells that land outside the output are dropped. Keep shapes small:
it is O(N * C_in * C_out/groups * prod(in) * prod(k)) Python steps.
"""

from __future__ import annotations

import itertools

import numpy as np


def conv_transpose_loops(x, weight, bias, stride, pad_begin, pad_end, output_padding, dilation, groups):
    """Batched ``(N, C_in, *in)`` transposed convolution; per-dim tuples for the rest."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    n, c_in = x.shape[:2]
    in_size = x.shape[2:]
    kernel = weight.shape[2:]
    c_out_g = weight.shape[1]
    c_in_g = c_in // groups
    out_size = tuple(
        (i - 1) * s - pb - pe + d * (k - 1) + op + 1
        for i, s, pb, pe, d, k, op in zip(in_size, stride, pad_begin, pad_end, dilation, kernel, output_padding)
    )
    out = np.zeros((n, c_out_g * groups, *out_size))
    for b in range(n):
        for ci in range(c_in):
            g = ci // c_in_g
            for cell in itertools.product(*(range(i) for i in in_size)):
                value = x[(b, ci, *cell)]
                for co in range(c_out_g):
                    for tap in itertools.product(*(range(k) for k in kernel)):
                        pos = tuple(c * s - pb + t * d for c, s, pb, t, d in zip(cell, stride, pad_begin, tap, dilation))
                        if all(0 <= p < o for p, o in zip(pos, out_size)):
                            out[(b, g * c_out_g + co, *pos)] += value * weight[(ci, co, *tap)]
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64).reshape(1, -1, *(1,) * len(in_size))
    return out


def conv_loops(x, weight, bias, stride, pad_begin, pad_end, dilation, groups):
    """Batched ``(N, C_in, *in)`` regular convolution (cross-correlation)."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    n, c_in = x.shape[:2]
    in_size = x.shape[2:]
    c_out = weight.shape[0]
    c_in_g = weight.shape[1]
    c_out_g = c_out // groups
    kernel = weight.shape[2:]
    out_size = tuple(
        (i + pb + pe - d * (k - 1) - 1) // s + 1
        for i, s, pb, pe, d, k in zip(in_size, stride, pad_begin, pad_end, dilation, kernel)
    )
    out = np.zeros((n, c_out, *out_size))
    for b in range(n):
        for co in range(c_out):
            g = co // c_out_g
            for cell in itertools.product(*(range(o) for o in out_size)):
                total = 0.0
                for cig in range(c_in_g):
                    for tap in itertools.product(*(range(k) for k in kernel)):
                        pos = tuple(c * s - pb + t * d for c, s, pb, t, d in zip(cell, stride, pad_begin, tap, dilation))
                        if all(0 <= p < i for p, i in zip(pos, in_size)):
                            total += x[(b, g * c_in_g + cig, *pos)] * weight[(co, cig, *tap)]
                out[(b, co, *cell)] = total
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64).reshape(1, -1, *(1,) * len(in_size))
    return out
