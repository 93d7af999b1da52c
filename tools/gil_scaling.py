#!/usr/bin/env python
"""Does the ``blas`` backend release the GIL? Two Python threads vs one (issue 7).

BLAS is limited to one thread (``tconv.set_num_threads(1)``, which the
backend hands on to BLAS, and ``tconv._threads.set_blas_threads(1)``), so
any speed-up of two Python threads over one can only come from the compiled
loops and the GEMM running without the GIL. The layers are decoder-sized
(the Python-side validation is a negligible share of each call).

    python tools/gil_scaling.py                 # prints the ratio per layer
    python tools/gil_scaling.py --calls 8 --repeats 3 --json

A ratio of 2.0 is perfect scaling; the target is >= 1.6. The figure needs
two idle cores: on a loaded machine it is lower, and says so little.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

if __package__ in (None, ""):  # run as a script from a source tree
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tconv  # noqa: E402
from tconv import _threads  # noqa: E402

TARGET = 1.6


def layers(dtype=np.float32):
    """Large layers: (name, function, args, kwargs)."""
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x2, w2 = r(4, 128, 32, 32), r(128, 64, 4, 4)
    x3, w3 = r(1, 32, 16, 16, 16), r(32, 16, 4, 4, 4)
    dy2 = r(4, 64, 64, 64)
    return [
        ("conv_transpose2d 4x128x32x32 k4 s2 p1", tconv.conv_transpose2d, (x2, w2), dict(stride=2, padding=1)),
        ("conv_transpose3d 1x32x16^3 k4 s2 p1", tconv.conv_transpose3d, (x3, w3), dict(stride=2, padding=1)),
        ("conv_transpose2d_backward (same layer)", tconv.conv_transpose2d_backward, (dy2, x2, w2),
         dict(stride=2, padding=1)),
    ]


def _run(fn, args, kwargs, calls, backend):
    for _ in range(calls):
        fn(*args, **kwargs, backend=backend)


def _timed(threads: int, fn, args, kwargs, calls, backend) -> float:
    """Seconds for ``threads`` threads to run ``calls`` calls each, started together."""
    barrier = threading.Barrier(threads + 1)
    errors = []

    def work():
        barrier.wait()
        try:
            _run(fn, args, kwargs, calls, backend)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


def limit_blas_to_one_thread() -> list[str]:
    """Limit BLAS to one thread the way tconv does; return the libraries that escaped it.

    A fresh threadpoolctl scan checks the result: a BLAS that tconv's limit
    missed (say, loaded after its controller was built) is limited here too,
    so that the measurement is about the GIL, and reported.
    """
    import threadpoolctl

    tconv.list_backends()  # load every backend, hence every BLAS they link
    tconv.set_num_threads(1)
    _threads.set_blas_threads(1)
    escaped = [f"{i['filepath']} ({i['num_threads']} threads)" for i in threadpoolctl.threadpool_info()
               if i.get("user_api") == "blas" and i.get("num_threads") != 1]
    if escaped:
        threadpoolctl.threadpool_limits(1, user_api="blas")
    return escaped


def measure(calls: int = 16, repeats: int = 5, backend: str = "blas", which=None) -> list[dict]:
    """Throughput of two threads over one, per layer (best of ``repeats`` for each)."""
    escaped = limit_blas_to_one_thread()
    if escaped:
        print("warning: tconv's BLAS limit missed " + "; ".join(escaped) + " (limited here instead)",
              file=sys.stderr)
    results = []
    try:
        for i, (name, fn, args, kwargs) in enumerate(layers()):
            if which is not None and i not in which:
                continue
            _run(fn, args, kwargs, 2, backend)  # warm-up: caches, page faults, BLAS buffers
            # interleaved, best of each: a burst of load from elsewhere hits both alike
            ones, twos = [], []
            for _ in range(repeats):
                ones.append(_timed(1, fn, args, kwargs, calls, backend))
                twos.append(_timed(2, fn, args, kwargs, calls, backend))
            one, two = min(ones), min(twos)
            ratio = (2 * calls / two) / (calls / one)
            results.append(dict(layer=name, calls_per_thread=calls, one_thread_s=one, two_threads_s=two,
                                ratio=ratio, blas_limit_missed=escaped))
    finally:
        tconv.set_num_threads(None)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=16, help="calls per thread (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many timings (default 5)")
    parser.add_argument("--backend", default="blas")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    results = measure(args.calls, args.repeats, args.backend)
    if args.json:
        print(json.dumps(dict(cores=cores, loadavg=os.getloadavg(), results=results)))
    else:
        print(f"backend {args.backend}, BLAS threads 1, cores {cores}, load average {os.getloadavg()[0]:.2f}")
        for r in results:
            flag = "ok" if r["ratio"] >= TARGET else f"below {TARGET}"
            print(f"  {r['layer']:<42} 1 thread {r['one_thread_s']:.3f}s, 2 threads {r['two_threads_s']:.3f}s "
                  f"(x{r['calls_per_thread']} calls each): ratio {r['ratio']:.2f} [{flag}]")
    return 0 if all(r["ratio"] >= TARGET for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
