"""The interface every backend implements, and the geometry it is handed.

A backend computes three primitives. Every convolution, transposed or not,
forward or backward, is one of them (``tconv.functional`` does the mapping):

==========================  ===========================================
primitive                   used for
==========================  ===========================================
``scatter`` (col2im)        conv_transpose forward, conv input gradient
``gather`` (im2col)         conv forward, conv_transpose input gradient
``weight_grad``             the weight gradient of both
==========================  ===========================================

A backend may also override ``gather_and_weight_grad``, the pair a
transposed convolution's backward needs, to share work between the two.

All three speak of two spatial grids tied by one index map. The *image* is
the dense side (a transposed convolution's output, a regular convolution's
input); the *grid* is the strided side (its input, resp. output). Grid cell
``l`` and kernel tap ``k`` meet image cell ``l * stride - pad_begin + k *
dilation`` in each spatial dim; taps that land outside the image are dropped.

Arrays reach a backend validated and normalised: C-contiguous, one float
dtype (float32 or float64) for all of them, always 5-D ``(N, C, D, H, W)``
(1-D and 2-D problems are lifted with unit dims), and the sizes in
``Geometry`` agree with the shapes. Kernels never re-validate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = ["Backend", "Geometry", "taps_leave_image", "weight_grad_needs_exact"]

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class Geometry:
    """Sizes of one lifted 3-D problem; plain ints only.

    Attributes
    ----------
    image, grid, kernel : (D, H, W)
        Spatial sizes of the dense side, the strided side and the kernel.
    stride, dilation, pad_begin : (D, H, W)
        The index map ``image = grid * stride - pad_begin + tap * dilation``.
        ``pad_begin`` may be negative (ONNX ``output_shape`` past the full output).
    groups : int
        Channel groups; channels are split in ``groups`` equal consecutive blocks.
    """

    image: Triple
    grid: Triple
    kernel: Triple
    stride: Triple
    dilation: Triple
    pad_begin: Triple
    groups: int

    def __hash__(self) -> int:
        # The plans of the backends are cached per geometry (``functools.lru_cache``),
        # so a geometry is hashed on every call: the fields' hash is kept after the
        # first time (it is what the dataclass's own ``__hash__`` would return).
        try:
            return self.__dict__["_hash"]
        except KeyError:
            value = hash((self.image, self.grid, self.kernel, self.stride, self.dilation,
                          self.pad_begin, self.groups))
            object.__setattr__(self, "_hash", value)
            return value


def taps_leave_image(geom: Geometry) -> bool:
    """Whether some (grid cell, tap) pair lands outside the image.

    A GEMM-based gather fills such taps with zeros, and ``0 * NaN`` is NaN:
    where this is true, a NaN or Inf weight (gather) or gradient
    (weight_grad; see ``weight_grad_needs_exact``) would reach cells that the
    definition drops. Backends use this to send such calls down an exact path.
    """
    for image, grid, kernel, stride, dilation, pad in zip(
        geom.image, geom.grid, geom.kernel, geom.stride, geom.dilation, geom.pad_begin
    ):
        if pad > 0 or (grid - 1) * stride - pad + (kernel - 1) * dilation >= image:
            return True
    return False


def weight_grad_needs_exact(grad_weight, geom: Geometry, xp=np) -> bool:
    """Whether a weight gradient summed through zero-filled taps must be computed
    again tap by tap: taps leave the image and ``grad_weight`` is not finite.

    A non-finite value of the grid side makes every product it enters NaN or
    Inf, zero-filled taps included, and it enters at least one sum: a finite
    result proves there was none. Checking the result is one pass over a
    weight-sized array, small next to the GEMMs that summed it (checking the
    grid instead cost up to a tenth of a backward pass). A non-finite result
    may also come from the image side or an overflow; the exact path computes
    those as the definition does.
    """
    return taps_leave_image(geom) and not bool(xp.isfinite(grad_weight).all())


class Backend:
    """Base class of a tconv backend.

    Subclass it, implement the three primitives, and register the class (or
    any zero-argument callable returning an instance) under the
    ``tconv.backends`` entry-point group. Shapes below use ``G`` for groups,
    ``P`` and ``Q`` for channels per group.
    """

    #: name used by ``TCONV_BACKEND``, ``set_backend`` and ``backend=``.
    name: ClassVar[str] = ""
    #: one line for ``list_backends()`` and ``python -m tconv info``.
    description: ClassVar[str] = ""
    #: rank when no backend is asked for: the highest available wins;
    #: ``None`` means never chosen implicitly (e.g. a GPU backend).
    default_priority: ClassVar[int | None] = None

    def availability(self) -> tuple[bool, str]:
        """``(True, "")`` when it can run here, else ``(False, why)``."""
        return True, ""

    def is_available(self) -> bool:
        """Whether this backend can run in this process."""
        return self.availability()[0]

    def release_workspace(self) -> None:
        """Drop the work buffers this backend keeps for the calling thread between
        calls, if any (the next call allocates them again). Optional."""

    # -- array handling: CPU backends keep NumPy; a device backend overrides --
    def asarray(self, array: Any, dtype: np.dtype) -> Any:
        """``array`` as a C-contiguous array of ``dtype`` that the kernels take."""
        return np.ascontiguousarray(array, dtype=dtype)

    def to_user(self, array: Any, user_arrays_are_numpy: bool) -> Any:
        """Convert a kernel result to what the caller passed in."""
        return array

    def is_native(self, array: Any) -> bool:
        """Whether ``array`` is one of this backend's own array kind (else NumPy-like)."""
        return isinstance(array, np.ndarray)

    # -- the three primitives --
    def scatter(self, grid_in, weight, bias, geom: Geometry):
        """col2im: ``out[n, gQ+q, image] = bias[gQ+q] + sum w[gP+p, q, k] * grid_in[n, gP+p, l]``.

        ``grid_in``: ``(N, G*P, *grid)``; ``weight``: ``(G*P, Q, *kernel)``;
        ``bias``: ``(G*Q,)`` or None; returns ``(N, G*Q, *image)``.
        """
        raise NotImplementedError

    def gather(self, image_in, weight, bias, geom: Geometry):
        """im2col: ``out[n, gQ+q, l] = bias[gQ+q] + sum w[gQ+q, p, k] * image_in[n, gP+p, image(l, k)]``.

        ``image_in``: ``(N, G*P, *image)``; ``weight``: ``(G*Q, P, *kernel)``;
        ``bias``: ``(G*Q,)`` or None; returns ``(N, G*Q, *grid)``.
        """
        raise NotImplementedError

    def weight_grad(self, image_in, grid_in, geom: Geometry):
        """``gw[gQ+q, p, k] = sum_n sum_l grid_in[n, gQ+q, l] * image_in[n, gP+p, image(l, k)]``.

        ``image_in``: ``(N, G*P, *image)``; ``grid_in``: ``(N, G*Q, *grid)``;
        returns ``(G*Q, P, *kernel)``.
        """
        raise NotImplementedError

    # -- optional: a pair of primitives in one call --
    def gather_and_weight_grad(self, image_in, weight, grid_in, geom: Geometry):
        """``(gather(image_in, weight, None, geom), weight_grad(image_in, grid_in, geom))``:
        a transposed convolution's input and weight gradients (``image_in`` is
        ``grad_output``, ``grid_in`` is ``x``).

        Both read ``image_in`` through the same im2col, which a backend may
        compute once for the two; this default makes the two calls.
        """
        return self.gather(image_in, weight, None, geom), self.weight_grad(image_in, grid_in, geom)
