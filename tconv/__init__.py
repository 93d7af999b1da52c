"""tconv: exact, fast transposed convolution (ConvTranspose) for NumPy arrays.

PyTorch's arithmetic, ONNX's padding options, a compiled BLAS core, and
backends chosen at run time. See ``README.md`` and ``SPEC.md``.
"""

from ._version import __version__
from .functional import (
    conv1d,
    conv1d_backward,
    conv2d,
    conv2d_backward,
    conv3d,
    conv3d_backward,
    conv_transpose1d,
    conv_transpose1d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    conv_transpose3d,
    conv_transpose3d_backward,
)
from .layers import Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from .registry import (
    BackendError,
    BackendInfo,
    get_backend,
    get_num_threads,
    list_backends,
    set_backend,
    set_num_threads,
    use_backend,
)
from . import shape
from . import _blas_library

_blas_library.requested()  # a bad TCONV_BLAS fails the import (see there)

__all__ = [
    "__version__",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "conv1d", "conv2d", "conv3d",
    "conv_transpose1d_backward", "conv_transpose2d_backward", "conv_transpose3d_backward",
    "conv1d_backward", "conv2d_backward", "conv3d_backward",
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Conv1d", "Conv2d", "Conv3d",
    "BackendError", "BackendInfo", "list_backends", "get_backend", "set_backend", "use_backend",
    "get_num_threads", "set_num_threads", "shape",
]
