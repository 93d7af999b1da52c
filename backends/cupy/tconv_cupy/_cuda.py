"""Launch of the CUDA kernels of ``kernels.cu`` through ``cupy.RawModule``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

KERNEL_SOURCE = Path(__file__).with_name("kernels.cu")

#: Threads per block; the grid-stride loops cover any element count.
BLOCK = 256
MAX_BLOCKS = 1 << 20

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


class CudaLauncher:
    """Compiles ``kernels.cu`` once (NVRTC, cached by CuPy) and launches its kernels."""

    def __init__(self):
        import cupy

        self._cupy = cupy
        self._module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=("--std=c++14",))

    def _launch(self, name: str, dtype, total: int, args: tuple) -> None:
        if total == 0:
            return
        kernel = self._module.get_function(f"{name}_{_SUFFIX[np.dtype(dtype)]}")
        blocks = min(MAX_BLOCKS, -(-total // BLOCK))
        kernel((blocks,), (BLOCK,), (*args, np.int64(total)))

    def im2col(self, image, cols, geo, groups, p, strides) -> None:
        """Fill ``cols`` from ``image``; ``strides``: cols' (sample, group, row) strides.

        ``cols`` holds exactly one element per (sample, group, row, cell).
        """
        self._launch("im2col", image.dtype, cols.size,
                     (image, cols, geo, np.int64(groups), np.int64(p),
                      *(np.int64(s) for s in strides)))

    def col2im(self, cols, out, bias, geo, groups, q) -> None:
        """``out = bias + col2im(cols)``; ``out`` is a C-contiguous slice of samples."""
        has_bias = bias is not None
        bias_arg = bias if has_bias else out  # never read when has_bias is 0
        self._launch("col2im", out.dtype, out.size,
                     (cols, out, bias_arg, np.int32(has_bias), geo, np.int64(groups), np.int64(q)))
