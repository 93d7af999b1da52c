"""The ``cupy`` backend: cuBLAS GEMMs and gather-form CUDA kernels (see ``_engine``).

CuPy arrays in, CuPy arrays out, with no host round trip; NumPy arrays in,
NumPy arrays out (copied to the device and back), so that
``TCONV_BACKEND=cupy`` works with unchanged user code. It is never chosen
implicitly (``default_priority = None``): a GPU is used only when asked for.

This module imports without CuPy; ``availability()`` then says why it
cannot run.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tconv.backend import Backend


@functools.lru_cache(maxsize=1)
def _cupy_status() -> tuple[Any, str]:
    """``(cupy module, "")`` when a CUDA device is usable, else ``(None, why)``."""
    try:
        import cupy
    except ImportError:
        return None, "CuPy is not installed (pip install 'tconv-cupy[cuda12]' or [cuda13])"
    except Exception as exc:  # a broken CUDA install can fail in odd ways at import
        return None, f"CuPy failed to import: {type(exc).__name__}: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return None, "no CUDA device"
    return cupy, ""


class CupyBackend(Backend):
    """GPU backend: cuBLAS through ``cupy.matmul``, im2col/col2im as CUDA kernels."""

    name = "cupy"
    description = "CuPy on a CUDA GPU: cuBLAS GEMM + gather-form CUDA col2im/im2col"
    default_priority = None

    def __init__(self):
        self._engine = None

    def availability(self) -> tuple[bool, str]:
        cupy, why = _cupy_status()
        return cupy is not None, why

    def _get_engine(self):
        if self._engine is None:
            cupy, why = _cupy_status()
            if cupy is None:  # the registry checks first; this guards direct use
                raise RuntimeError(f"cupy backend cannot run here: {why}")
            from ._cuda import CudaLauncher
            from ._engine import Engine

            self._engine = Engine(cupy, CudaLauncher())
        return self._engine

    # -- arrays: device in, device out; host in, host out --
    def asarray(self, array: Any, dtype: np.dtype) -> Any:
        cupy = _cupy_status()[0]
        return cupy.ascontiguousarray(cupy.asarray(array, dtype=dtype))

    def to_user(self, array: Any, user_arrays_are_numpy: bool) -> Any:
        if user_arrays_are_numpy:
            return _cupy_status()[0].asnumpy(array)
        return array

    def is_native(self, array: Any) -> bool:
        cupy = _cupy_status()[0]
        return cupy is not None and isinstance(array, cupy.ndarray)

    # -- the three primitives --
    def scatter(self, grid_in, weight, bias, geom):
        return self._get_engine().scatter(grid_in, weight, bias, geom)

    def gather(self, image_in, weight, bias, geom):
        return self._get_engine().gather(image_in, weight, bias, geom)

    def weight_grad(self, image_in, grid_in, geom):
        return self._get_engine().weight_grad(image_in, grid_in, geom)
