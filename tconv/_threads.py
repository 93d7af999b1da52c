"""BLAS thread control through threadpoolctl, cheap enough for every call.

NumPy, SciPy and scipy-openblas32 (the core's, ``_blas_library``) may each load
their own OpenBLAS; threadpoolctl finds them all.
The controller is built once (it scans the loaded libraries) and a limit is
only applied when it differs from the one already in force.
"""

from __future__ import annotations

import importlib
import threading

from threadpoolctl import ThreadpoolController

_controller: ThreadpoolController | None = None
_lock = threading.Lock()
_current: int | None = None


def controller() -> ThreadpoolController:
    """The process's ThreadpoolController (built on first use)."""
    global _controller
    if _controller is None:
        # Load the BLAS the core calls (``_blas_library``) before threadpoolctl
        # scans the process: a library loaded after the scan is never controlled.
        importlib.import_module("scipy.linalg.cython_blas")
        importlib.import_module("tconv._blas_backend")
        with _lock:
            if _controller is None:
                _controller = ThreadpoolController()
    return _controller


def blas_info() -> list[dict]:
    """threadpoolctl's description of every BLAS library loaded."""
    return [info for info in controller().info() if info.get("user_api") == "blas"]


def forget_blas_threads() -> None:
    """Forget the count last set, so the next ``set_blas_threads`` applies it again
    (for when something else, e.g. the user's threadpoolctl, changed it)."""
    global _current
    _current = None


def set_blas_threads(n: int) -> None:
    """Set every loaded BLAS to ``n`` threads (no-op when tconv already set ``n``).

    The count is process-wide, and OpenBLAS (0.3.30, measured) ignores it when
    set from a thread other than the main one: ``n`` is remembered only once
    every library reports it, so a call from a worker thread that did not take
    leaves the next caller to set it again.
    """
    global _current
    if _current == n:
        return
    blas = controller().select(user_api="blas")  # outside the lock: controller() takes it
    with _lock:
        for lib in blas.lib_controllers:
            lib.set_num_threads(n)
        took = all(lib.get_num_threads() == n for lib in blas.lib_controllers)
        _current = n if took else None

