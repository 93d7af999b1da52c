"""The ``numpy`` backend: the readable reference, no compiled code.

Each kernel tap ``k`` links a strided run of grid cells to a strided run of
image cells (``image = l * stride - pad_begin + k * dilation``). A
convolution is then one channel contraction per tap, added into (scatter) or
read from (gather) a strided slice. That is the whole algorithm.
"""

from __future__ import annotations

import itertools

import numpy as np

from .backend import Backend, Geometry


def _tap_slices(geom: Geometry):
    """Yield ``(tap, grid_slices, image_slices)`` for every kernel tap that hits the image."""
    per_dim = []
    for image, grid, kernel, stride, dilation, pad in zip(
        geom.image, geom.grid, geom.kernel, geom.stride, geom.dilation, geom.pad_begin
    ):
        options = []
        for tap in range(kernel):
            offset = tap * dilation - pad
            first = max(0, -(offset // stride))  # first l with image >= 0 (a ceil division)
            last = min(grid - 1, (image - 1 - offset) // stride)  # last l with image < size
            if last < first:
                continue
            start = first * stride + offset
            options.append(
                (tap, slice(first, last + 1), slice(start, start + (last - first) * stride + 1, stride))
            )
        per_dim.append(options)
    for combo in itertools.product(*per_dim):
        tap = tuple(c[0] for c in combo)
        yield tap, tuple(c[1] for c in combo), tuple(c[2] for c in combo)


def _grouped(array: np.ndarray, groups: int) -> np.ndarray:
    """``(N, G*C, ...)`` -> ``(N, G, C, ...)`` (a view)."""
    n, c = array.shape[:2]
    return array.reshape(n, groups, c // groups, *array.shape[2:])


class NumpyBackend(Backend):
    name = "numpy"
    description = "pure NumPy reference: one channel contraction per kernel tap"
    default_priority = 0

    def scatter(self, grid_in, weight, bias, geom):
        g = geom.groups
        n = grid_in.shape[0]
        q = weight.shape[1]
        out = np.zeros((n, g, q, *geom.image), dtype=grid_in.dtype)
        x = _grouped(grid_in, g)  # (N, G, P, *grid)
        w = weight.reshape(g, -1, q, *geom.kernel)  # (G, P, Q, *k)
        for tap, grid_sl, image_sl in _tap_slices(geom):
            # (N, G, P, cells) x (G, P, Q) -> (N, G, Q, cells)
            contribution = np.einsum("ngpdhw,gpq->ngqdhw", x[(...,) + grid_sl], w[(...,) + tap])
            out[(...,) + image_sl] += contribution
        out = out.reshape(n, g * q, *geom.image)
        if bias is not None:
            out += bias.reshape(1, -1, 1, 1, 1)
        return out

    def gather(self, image_in, weight, bias, geom):
        g = geom.groups
        n = image_in.shape[0]
        q = weight.shape[0] // g
        out = np.zeros((n, g, q, *geom.grid), dtype=image_in.dtype)
        x = _grouped(image_in, g)  # (N, G, P, *image)
        w = weight.reshape(g, q, -1, *geom.kernel)  # (G, Q, P, *k)
        for tap, grid_sl, image_sl in _tap_slices(geom):
            contribution = np.einsum("ngpdhw,gqp->ngqdhw", x[(...,) + image_sl], w[(...,) + tap])
            out[(...,) + grid_sl] += contribution
        out = out.reshape(n, g * q, *geom.grid)
        if bias is not None:
            out += bias.reshape(1, -1, 1, 1, 1)
        return out

    def weight_grad(self, image_in, grid_in, geom):
        g = geom.groups
        x = _grouped(image_in, g)  # (N, G, P, *image)
        dy = _grouped(grid_in, g)  # (N, G, Q, *grid)
        p, q = x.shape[2], dy.shape[2]
        grad = np.zeros((g, q, p, *geom.kernel), dtype=image_in.dtype)
        for tap, grid_sl, image_sl in _tap_slices(geom):
            grad[(...,) + tap] = np.einsum(
                "ngqdhw,ngpdhw->gqp", dy[(...,) + grid_sl], x[(...,) + image_sl]
            )
        return grad.reshape(g * q, p, *geom.kernel)
