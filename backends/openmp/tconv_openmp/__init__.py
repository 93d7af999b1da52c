"""tconv-openmp: the multicore backend of tconv (Cython ``prange`` + BLAS).

Installing this distribution registers the backend ``openmp`` under the
``tconv.backends`` entry-point group; tconv then picks it by default (its
``default_priority`` is above the core ``blas`` backend's). Importing this
package never fails for want of the compiled kernels: the backend reports
itself unavailable with the reason instead.
"""

from .backend import OpenMPBackend

__all__ = ["OpenMPBackend"]
__version__ = "0.1.0"
