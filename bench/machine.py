"""The machine the figures come from: CPU, cores, BLAS, and its GEMM peak.

The peak is measured, not looked up: a large single-precision GEMM through
the BLAS that tconv's core calls (``tconv._blas_library``: scipy-openblas32's
OpenBLAS where installed, else SciPy's), at the thread count of the cases it
is compared with. On a shared
machine one measurement can catch a busy moment, so the suite measures it
before and after each thread count's cases and keeps the faster, and times
it again beside the cases held to the peak target.
"""

from __future__ import annotations

import os
import platform
from typing import Any, Callable

import numpy as np

from .timing import measure_time

__all__ = ["cpu_model", "core_counts", "blas_libraries", "core_blas", "machine_info", "gemm_runner", "gemm_peak"]


def _proc_cpuinfo() -> list[dict[str, str]]:
    """``/proc/cpuinfo`` as one dict per logical CPU (empty off Linux)."""
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
    except OSError:
        return []
    cpus = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
        cpus.append(entry)
    return cpus


def cpu_model() -> str:
    """The CPU's brand string (py-cpuinfo when installed, else ``/proc/cpuinfo``)."""
    try:
        import cpuinfo  # py-cpuinfo

        brand = cpuinfo.get_cpu_info().get("brand_raw")
        if brand:
            return brand
    except Exception:  # not installed, or it failed on this platform
        pass
    for cpu in _proc_cpuinfo():
        if cpu.get("model name"):
            return cpu["model name"]
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD extensions that set the GEMM peak (AVX2, FMA, AVX-512...)."""
    cpus = _proc_cpuinfo()
    flags = cpus[0].get("flags", "").split() if cpus else []
    return sorted(f for f in flags if f.startswith(("avx", "fma", "sse4", "amx")))


def core_counts() -> dict[str, int | None]:
    """Logical CPUs, physical cores (``/proc/cpuinfo``), and CPUs this process may use."""
    cpus = _proc_cpuinfo()
    physical = {(c.get("physical id"), c.get("core id")) for c in cpus if "core id" in c}
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {"logical": os.cpu_count(), "physical": len(physical) or None, "usable": usable}


def blas_libraries() -> list[dict[str, Any]]:
    """Every BLAS loaded in this process (threadpoolctl), the core's one marked
    (``tconv._blas_library``: scipy-openblas32's where installed, else SciPy's)."""
    from threadpoolctl import threadpool_info

    from tconv import _blas_backend, _blas_library  # noqa: F401  (loads the core's BLAS)

    libraries = []
    for lib in threadpool_info():
        if lib.get("user_api") != "blas":
            continue
        entry = {
            key: lib.get(key)
            for key in ("internal_api", "version", "architecture", "threading_layer", "num_threads", "filepath")
        }
        entry["used_by_core"] = _blas_library.core_calls(lib.get("filepath", ""))
        libraries.append(entry)
    return libraries


def core_blas() -> dict[str, Any] | None:
    """The BLAS tconv's core calls (threadpoolctl's entry), or None if it could not be told apart."""
    for lib in blas_libraries():
        if lib["used_by_core"]:
            return lib
    return None


def machine_info() -> dict[str, Any]:
    """What the JSON records about the machine (the GEMM peak is added by the suite)."""
    import numpy
    import scipy

    from tconv import _blas_library

    blas = core_blas()
    choice = _blas_library.chosen()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": core_counts(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "blas": (
            f"{blas['internal_api']} {blas['version']} ({blas['architecture']}, {blas['threading_layer']})"
            if blas
            else "unknown"
        ),
        "blas_provider": choice.name if choice else None,
        "blas_libraries": blas_libraries(),
    }


def gemm_runner(threads: int, size: int = 2048) -> tuple[Callable[[], Any], float]:
    """A square single-precision GEMM ``C = A @ B`` through the core's BLAS (its
    ``blas_matmul`` twin: the very ``sgemm_`` its kernels call), and its flop count.

    The call sets the BLAS to ``threads`` threads through tconv's own switch (a
    backend called before may have left it at another count).
    """
    from tconv._blas_backend import _blas_core
    from tconv._threads import set_blas_threads

    rng = np.random.default_rng(0)
    a = np.asfortranarray(rng.standard_normal((size, size), dtype=np.float32))
    b = np.asfortranarray(rng.standard_normal((size, size), dtype=np.float32))
    c = np.zeros((size, size), dtype=np.float32, order="F")

    def run():
        set_blas_threads(threads)
        _blas_core.blas_matmul(a, b, c)

    return run, 2.0 * size**3


def gemm_peak(threads: int, size: int = 2048, repeat: int = 5) -> dict[str, Any]:
    """Single-precision GEMM speed of the core's BLAS at ``threads`` threads.

    Returns
    -------
    dict
        ``gflops`` (from the median), ``best_gflops``, ``size``, ``threads``
        and the raw timing.
    """
    run, flops = gemm_runner(threads, size)
    timing = measure_time(run, repeat, min_sample_s=0.0)
    return {
        "threads": threads,
        "size": size,
        "gflops": flops / timing.median / 1e9,
        "best_gflops": flops / min(timing.samples) / 1e9,
        "timing": timing.as_dict(),
    }
