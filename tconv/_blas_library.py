"""Which BLAS the compiled core's GEMMs call, chosen once when tconv loads.

SciPy's ``scipy.linalg.cython_blas`` is always there; it calls the OpenBLAS
that SciPy's wheel bundles (0.3.30 with SciPy 1.17). The ``scipy-openblas32``
wheel is the same OpenBLAS build, published on its own and newer (0.3.34),
and is a tconv dependency: where it is installed and loads, the core calls
its ``sgemm_`` and ``dgemm_`` instead. Measured on this project's 2-core
AVX-512 machine, 1 thread, medians of 9, interleaved: DCGAN 256->128's
backward GEMMs (M 512 K 2048 N 256, the column tile times the weight)
92 -> 102 GFLOP/s, (M 2048 K 512 N 256, the weight gradient) 99 -> 101;
the whole backward pass 95-99 -> 90-93 ms; a 2048^3 sgemm unchanged (105).

The library is opened with ``RTLD_LOCAL``, not by importing the
``scipy_openblas32`` package (which opens it ``RTLD_GLOBAL``, where SciPy
extension modules loaded afterwards would bind to it too): tconv changes
no one else's BLAS. ``TCONV_BLAS=scipy`` keeps SciPy's; ``TCONV_BLAS=
scipy-openblas32`` fails loudly where that library cannot be used.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys
from dataclasses import dataclass

#: The choices of ``TCONV_BLAS``: ``auto`` (the default) takes the first that loads.
CHOICES = ("auto", "scipy-openblas32", "scipy")


@dataclass(frozen=True)
class BlasLibrary:
    """The BLAS the core calls: ``name`` (a ``CHOICES`` entry), the shared library's
    ``path`` (None for SciPy's, which threadpoolctl finds in SciPy's folder) and
    why it was chosen."""

    name: str
    path: str | None
    reason: str


def _openblas32_file() -> str | None:
    """The shared library inside the installed ``scipy_openblas32`` package, found
    without importing the package."""
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    pattern = "libscipy_openblas*.dll" if sys.platform == "win32" else "libscipy_openblas*"
    files = sorted(f for f in glob.glob(os.path.join(lib_dir, pattern))
                   if f.endswith((".so", ".dylib", ".dll")) or ".so." in f)
    return files[0] if files else None


def _load_openblas32(core) -> BlasLibrary:
    """Point the core at ``scipy-openblas32``'s GEMMs; raises OSError where it cannot."""
    path = _openblas32_file()
    if path is None:
        raise OSError("the scipy-openblas32 package is not installed")
    if sys.platform == "win32":  # (its DLL's folder must be searchable for its own imports)
        os.add_dll_directory(os.path.dirname(path))
    library = ctypes.CDLL(path)  # RTLD_LOCAL: see the module docstring
    try:
        sgemm, dgemm = library.scipy_sgemm_, library.scipy_dgemm_
    except AttributeError as exc:
        raise OSError(f"{path} has no scipy_sgemm_/scipy_dgemm_ ({exc})") from exc
    _KEEP.append(library)  # (never unloaded: the core holds its function pointers)
    core.use_blas(ctypes.cast(sgemm, ctypes.c_void_p).value, ctypes.cast(dgemm, ctypes.c_void_p).value)
    config = getattr(library, "scipy_openblas_get_config", None)
    if config is not None:
        config.restype = ctypes.c_char_p
        config = config().decode(errors="replace")
    return BlasLibrary("scipy-openblas32", path, config or "installed")


_KEEP: list = []
_chosen: BlasLibrary | None = None


def _choice(wanted: str) -> str:
    """``wanted`` as a ``CHOICES`` entry (any case, spaces around ignored); ValueError if none."""
    wanted = wanted.strip().lower()
    if wanted not in CHOICES:
        raise ValueError(f"TCONV_BLAS={wanted!r}: expected one of {', '.join(CHOICES)}")
    return wanted


def select(wanted: str, core) -> BlasLibrary:
    """Point ``core`` (``tconv._blas_core``) at the BLAS ``wanted`` names (a ``CHOICES``
    entry, any case): ``auto`` takes scipy-openblas32's where it loads, else SciPy's.

    Raises
    ------
    ValueError
        ``wanted`` names no choice, or names ``scipy-openblas32`` where it cannot load.
    """
    wanted = _choice(wanted)
    if wanted != "scipy":
        try:
            return _load_openblas32(core)
        except OSError as exc:
            if wanted == "scipy-openblas32":
                raise ValueError(f"TCONV_BLAS=scipy-openblas32, but it cannot be used: {exc}") from exc
            reason = f"scipy-openblas32 not used: {exc}"
    else:
        reason = "TCONV_BLAS=scipy"
    core.use_blas(0, 0)
    return BlasLibrary("scipy", None, reason)


def requested() -> str:
    """``TCONV_BLAS`` (default ``auto``), checked without loading anything: tconv's
    import calls this, so that a bad value fails there, loudly, instead of making
    the core's backends unavailable (the registry reports a backend that fails to
    load; it would quietly fall back to the numpy backend).

    Raises
    ------
    ValueError
        An unknown name, or ``scipy-openblas32`` where it is not installed.
    """
    wanted = _choice(os.environ.get("TCONV_BLAS") or "auto")
    if wanted == "scipy-openblas32" and _openblas32_file() is None:
        raise ValueError("TCONV_BLAS=scipy-openblas32, but it cannot be used: the scipy-openblas32 package "
                         "is not installed (pip install scipy-openblas32)")
    return wanted


def choose(core) -> BlasLibrary:
    """``select`` by ``TCONV_BLAS`` (``requested``), once: later calls return that choice."""
    global _chosen
    if _chosen is None:
        _chosen = select(requested(), core)
    return _chosen


def chosen() -> BlasLibrary | None:
    """The choice made (None before the core loaded, or where it is not built)."""
    return _chosen


def core_calls(path: str) -> bool:
    """Whether the BLAS shared library at ``path`` (as threadpoolctl reports it) is
    the one the core's GEMMs call."""
    if _chosen is None or not path:
        return False
    if _chosen.path is not None:
        return os.path.realpath(path) == os.path.realpath(_chosen.path)
    import scipy

    site = os.path.dirname(os.path.dirname(os.path.realpath(scipy.__file__)))
    first = os.path.relpath(os.path.realpath(path), site).split(os.sep)[0]
    return first in ("scipy", "scipy.libs")  # (not scipy_openblas32: another wheel)
