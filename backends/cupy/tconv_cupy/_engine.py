"""The CuPy backend's algorithm, written against an array module ``xp``.

GEMMs are ``xp.matmul`` (cuBLAS under CuPy), batched over samples and
groups; im2col and col2im are the gather-form kernels of ``kernels.cu``,
reached through a *launcher* (``_cuda.CudaLauncher`` on a GPU). Written this
way, the same code runs on the CPU with NumPy and the kernels compiled for
the host, which is how the test suite checks it where there is no GPU.

Work is cut into chunks of samples whose column buffer fits
``WORKSPACE_BYTES``; chunks are summed in order (``weight_grad``), so
results do not depend on anything but the shape. NaN or Inf weights (or
gradients) with padding take the reference's tap-by-tap path on the host,
as ``0 * NaN`` in a zero-filled im2col would spread them where the
definition does not.
"""

from __future__ import annotations

import math

import numpy as np

from tconv._numpy_backend import NumpyBackend
from tconv.backend import Geometry, taps_leave_image, weight_grad_needs_exact

#: Upper bound of the column buffer of one chunk (device memory).
WORKSPACE_BYTES = 256 << 20


def geometry_vector(geom: Geometry) -> np.ndarray:
    """The 18 int64 sizes the kernels read (``geo`` in kernels.cu)."""
    return np.array(
        [*geom.image, *geom.grid, *geom.kernel, *geom.stride, *geom.dilation, *geom.pad_begin],
        dtype=np.int64,
    )


def _chunk(n: int, per_sample: int, itemsize: int) -> int:
    """Samples per chunk: as many as fit the workspace, at least one."""
    return max(1, min(n, WORKSPACE_BYTES // max(1, per_sample * itemsize)))


class Engine:
    """scatter / gather / weight_grad on ``xp`` arrays with a kernel ``launcher``.

    The launcher provides ``im2col(image, cols, geo, groups, p, strides)``
    and ``col2im(cols, out, bias, geo, groups, q)`` (see ``_cuda``).
    """

    def __init__(self, xp, launcher):
        self.xp = xp
        self.launcher = launcher

    def _needs_exact(self, geom: Geometry, weight) -> bool:
        """im2col fills off-image taps with zeros, and ``0 * NaN`` is NaN: where
        such taps would meet a non-finite ``weight``, compute tap by tap instead
        (the weight gradient checks its result: ``weight_grad_needs_exact``)."""
        return taps_leave_image(geom) and not bool(self.xp.isfinite(weight).all())

    def _exact(self, primitive: str, *args):
        """The reference's answer on the host, brought back (rare: NaN/Inf with padding)."""
        to_host = getattr(self.xp, "asnumpy", np.asarray)
        host = [a if a is None or isinstance(a, Geometry) else to_host(a) for a in args]
        return self.xp.asarray(getattr(NumpyBackend(), primitive)(*host))

    def _geo(self, geom: Geometry):
        return self.xp.asarray(geometry_vector(geom))

    def scatter(self, grid_in, weight, bias, geom: Geometry):
        xp = self.xp
        n, c_in = grid_in.shape[:2]
        g = geom.groups
        p, q = c_in // g, weight.shape[1]
        taps, cells = math.prod(geom.kernel), math.prod(geom.grid)
        # W_g^T: (G, Q*K, P); X: (N, G, P, L); cols = W_g^T @ X: (N, G, Q*K, L)
        w_t = weight.reshape(g, p, q * taps).transpose(0, 2, 1)
        x = grid_in.reshape(n, g, p, cells)
        out = xp.empty((n, g * q, *geom.image), dtype=grid_in.dtype)
        geo = self._geo(geom)
        step = _chunk(n, g * q * taps * cells, grid_in.itemsize)
        for n0 in range(0, n, step):
            cols = xp.matmul(w_t, x[n0:n0 + step])
            self.launcher.col2im(cols, out[n0:n0 + step], bias, geo, g, q)
        return out

    def gather(self, image_in, weight, bias, geom: Geometry):
        if self._needs_exact(geom, weight):
            return self._exact("gather", image_in, weight, bias, geom)
        xp = self.xp
        n, c_in = image_in.shape[:2]
        g = geom.groups
        p, q = c_in // g, weight.shape[0] // g
        taps, cells = math.prod(geom.kernel), math.prod(geom.grid)
        w = weight.reshape(g, q, p * taps)
        out = xp.empty((n, g, q, cells), dtype=image_in.dtype)
        geo = self._geo(geom)
        step = _chunk(n, g * p * taps * cells, image_in.itemsize)
        for n0 in range(0, n, step):
            chunk = image_in[n0:n0 + step]
            m = chunk.shape[0]
            cols = xp.empty((m, g, p * taps, cells), dtype=image_in.dtype)
            self.launcher.im2col(chunk, cols, geo, g, p, (g * p * taps * cells, p * taps * cells, cells))
            out[n0:n0 + m] = xp.matmul(w, cols)  # (G, Q, P*K) @ (m, G, P*K, L)
        if bias is not None:
            out += bias.reshape(1, g, q, 1)
        return out.reshape(n, g * q, *geom.grid)

    def weight_grad(self, image_in, grid_in, geom: Geometry):
        xp = self.xp
        n, c_img = image_in.shape[:2]
        g = geom.groups
        p, q = c_img // g, grid_in.shape[1] // g
        taps, cells = math.prod(geom.kernel), math.prod(geom.grid)
        geo = self._geo(geom)
        grad = None
        step = _chunk(n, g * (p * taps + q) * cells, image_in.itemsize)
        for n0 in range(0, n, step):
            chunk = image_in[n0:n0 + step]
            m = chunk.shape[0]
            # samples side by side: cols (G, P*K, m*L), dY (G, Q, m*L)
            cols = xp.empty((g, p * taps, m * cells), dtype=image_in.dtype)
            self.launcher.im2col(chunk, cols, geo, g, p, (cells, p * taps * m * cells, m * cells))
            dy = xp.ascontiguousarray(
                grid_in[n0:n0 + m].reshape(m, g, q, cells).transpose(1, 2, 0, 3)
            ).reshape(g, q, m * cells)
            part = xp.matmul(dy, cols.transpose(0, 2, 1))  # (G, Q, P*K)
            grad = part if grad is None else grad + part
        grad = grad.reshape(g * q, p, *geom.kernel)
        if weight_grad_needs_exact(grad, geom, xp):
            return self._exact("weight_grad", image_in, grid_in, geom)
        return grad
