"""tconv-cupy: the GPU backend of tconv (CuPy, cuBLAS, CUDA kernels).

Installing this distribution registers the backend ``cupy`` under the
``tconv.backends`` entry-point group. It imports without CuPy or a GPU;
the backend then reports itself unavailable, and selecting it raises
``tconv.BackendError`` with the reason. Install CuPy with an extra:
``pip install "tconv-cupy[cuda12]"`` (or ``[cuda13]``).
"""

from .backend import CupyBackend

__all__ = ["CupyBackend"]
__version__ = "0.1.0"
