"""The figures the benchmark issue sets targets on, per backend and thread count.

* geometric mean over the cases of the speedup against the best peer (>= 1.0),
  and the smallest one (>= 0.8);
* the three batch-64 DCGAN layers' fraction of the measured GEMM peak (>= 0.7);
* the seed example's per-call time over PyTorch's (<= 2.0);
* the extra memory of a call (<= 64 MiB).

The targets bind tconv's default backend; the others are summarised the same
way for comparison.
"""

from __future__ import annotations

import math
from typing import Any

from .layers import DCGAN_PEAK, SEED

__all__ = ["TARGETS", "summarize", "geomean"]

TARGETS = {
    "geomean_speedup": 1.0,
    "min_speedup": 0.8,
    "dcgan_peak_fraction": 0.7,
    "seed_time_over_torch": 2.0,
    "extra_mib": 64.0,
}


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
