"""The figures the benchmark issue sets targets on, per backend and thread count.

* geometric mean over the cases of the speedup against the best peer (>= 1.0),
  and the smallest one (>= 0.8);
* the three batch-64 DCGAN layers' fraction of the measured GEMM peak (>= 0.7);
* the seed example's per-call time over PyTorch's (<= 2.0);
* the extra memory of a call (<= 64 MiB).

The targets bind tconv's default backend; the others are summarised the same
way for comparison.

Apart from these, the thread scaling of the large shapes (``SCALING_CASES``):
the OpenMP backend at 2 threads at least 1.7x as fast as at 1 thread, on
this 2-core machine, judged on the side-by-side measurement of
:func:`bench.suite.scaling_plan` (the per-thread-count tables are taken
minutes apart, too far for a ratio).
"""

from __future__ import annotations

import math
from typing import Any

from .layers import DCGAN_PEAK, SEED

__all__ = ["TARGETS", "SCALING_TARGET", "summarize", "summarize_scaling", "geomean"]

TARGETS = {
    "geomean_speedup": 1.0,
    "min_speedup": 0.8,
    "dcgan_peak_fraction": 0.7,
    "seed_time_over_torch": 2.0,
    "extra_mib": 64.0,
}

#: The thread-scaling target: ``backend`` at ``threads[1]`` threads at least
#: ``speedup`` times as fast as at ``threads[0]``, on every large shape.
SCALING_TARGET = {"backend": "openmp", "threads": (1, 2), "speedup": 1.7}


def geomean(values: list[float]) -> float | None:
    """Geometric mean (None for an empty list)."""
    values = [v for v in values if v and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _one(document: dict[str, Any], backend: str, threads: int) -> dict[str, Any] | None:
    rows = [
        (r, r["tconv"][backend])
        for r in document["results"]
        if r["threads"] == threads and backend in r["tconv"]
    ]
    if not rows:
        return None
    timed = [(r, t) for r, t in rows if "speedup" in t and "best" in t["speedup"]]
    speedups = {r["case"]: t["speedup"]["best"] for r, t in timed}
    forward = [t["speedup"]["best"] for r, t in timed if r["direction"] == "forward"]
    backward = [t["speedup"]["best"] for r, t in timed if r["direction"] == "backward"]
    out: dict[str, Any] = {
        "backend": backend,
        "threads": threads,
        "cases": len(rows),
        "failed": sorted(r["case"] for r, t in rows if "median_s" not in t),
        "geomean_speedup": geomean(list(speedups.values())),
        "geomean_speedup_forward": geomean(forward),
        "geomean_speedup_backward": geomean(backward),
    }
    if speedups:
        worst = min(speedups, key=speedups.get)
        out["min_speedup"] = speedups[worst]
        out["min_speedup_case"] = worst
        out["below_min"] = sorted(c for c, s in speedups.items() if s < TARGETS["min_speedup"])
    out["dcgan_peak_fraction"] = {
        r["case"]: t.get("peak_fraction")
        for r, t in rows
        if r["case"] in DCGAN_PEAK
    }
    for r, t in rows:
        if r["case"] == SEED and "median_s" in t:
            out["seed_us"] = t["median_s"] * 1e6
            torch = r["peers"].get("torch", {})
            if "median_s" in torch:
                out["seed_torch_us"] = torch["median_s"] * 1e6
                out["seed_time_over_torch"] = t["median_s"] / torch["median_s"]
    memories = [(r["case"], t["memory"]["extra_mib"]) for r, t in rows if t.get("memory", {}).get("extra_mib") is not None]
    if memories:
        case, mib = max(memories, key=lambda item: item[1])
        out["max_extra_mib"] = mib
        out["max_extra_mib_case"] = case
    out["blas_threads_mismatch"] = sorted(
        r["case"]
        for r, t in rows
        if t.get("blas_threads_after_call") not in (None, threads)
    )
    out["meets"] = _meets(out)
    return out


def _meets(s: dict[str, Any]) -> dict[str, bool | None]:
    """Each target: True, False, or None when it could not be measured."""
    def at_least(value, target):
        return None if value is None else value >= target

    fractions = [v for v in s["dcgan_peak_fraction"].values() if v is not None]
    return {
        "geomean_speedup": at_least(s.get("geomean_speedup"), TARGETS["geomean_speedup"]),
        "min_speedup": at_least(s.get("min_speedup"), TARGETS["min_speedup"]),
        "dcgan_peak_fraction": (
            None if not fractions else min(fractions) >= TARGETS["dcgan_peak_fraction"]
        ),
        "seed_time_over_torch": (
            None if s.get("seed_time_over_torch") is None
            else s["seed_time_over_torch"] <= TARGETS["seed_time_over_torch"]
        ),
        "extra_mib": (
            None if s.get("max_extra_mib") is None else s["max_extra_mib"] <= TARGETS["extra_mib"]
        ),
    }


def summarize(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary per (backend, thread count), the default backend first."""
    default = document.get("default_backend")
    backends = sorted(document["backends"], key=lambda name: (name != default, name))
    threads = sorted({r["threads"] for r in document["results"]})
    summaries = []
    for backend in backends:
        for n in threads:
            one = _one(document, backend, n)
            if one is not None:
                one["default"] = backend == default
                summaries.append(one)
    return summaries


def summarize_scaling(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Per backend, the thread-scaling speedups of the large shapes and their verdict.

    Parameters
    ----------
    document : dict
        A benchmark document with its ``scaling`` records.

    Returns
    -------
    list of dict
        One per backend with a timed scaling record: ``backend``,
        ``threads`` (low, high), ``speedups`` per case (median over median),
        ``min_speedup``, ``geomean_speedup`` and ``meets`` - True or False
        for the target's backend when the thread counts are the target's,
        else None.
    """
    out: dict[str, dict[str, Any]] = {}
    for r in document.get("scaling", []):
        if "speedup" not in r:
            continue
        one = out.setdefault(r["backend"], {"backend": r["backend"], "threads": r["threads"], "speedups": {}})
        one["speedups"][r["case"]] = r["speedup"]
    for one in out.values():
        values = list(one["speedups"].values())
        one["min_speedup"] = min(values)
        one["geomean_speedup"] = geomean(values)
        judged = one["backend"] == SCALING_TARGET["backend"] and tuple(one["threads"]) == SCALING_TARGET["threads"]
        one["target"] = SCALING_TARGET["speedup"] if judged else None
        one["meets"] = one["min_speedup"] >= SCALING_TARGET["speedup"] if judged else None
    return list(out.values())
