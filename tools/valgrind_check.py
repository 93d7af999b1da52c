#!/usr/bin/env python
"""valgrind memcheck of tconv's compiled core, the alternative to ASan (issue 7).

    python tools/valgrind_check.py            # run under valgrind, count reports in tconv's code
    python tools/valgrind_check.py --driver   # (what valgrind runs) every primitive on the blas backend

CPython and NumPy produce many memcheck reports of their own (uninitialised
reads in the interpreter and the dynamic loader, without a suppression file),
so only reports whose stack passes through tconv's compiled code count.
The core must be an uninstrumented build (an ASan build cannot run under
valgrind); ``TCONV_DEBUG=1`` gives ``-O0 -g`` with line numbers.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import subprocess
import sys
import tempfile

OURS = re.compile(r"_blas_core|tconv_openmp/_kernels|_kernels\.cpython")


def driver() -> None:
    import numpy as np

    import tconv

    rng = np.random.default_rng(0)
    for nd, transposed, kw in itertools.product(
        (1, 2, 3), (True, False),
        (dict(stride=2, padding=1), dict(padding="same"), dict(stride=3, dilation=2, groups=2)),
    ):
        groups = kw.get("groups", 1)
        x = rng.standard_normal((2, 4) + (5,) * nd)
        if transposed:
            w = rng.standard_normal((4, 3) + (3,) * nd)
        else:
            w = rng.standard_normal((6, 4 // groups) + (3,) * nd)
        name = ("conv_transpose" if transposed else "conv") + f"{nd}d"
        y = getattr(tconv, name)(x, w, **kw, backend="blas")
        getattr(tconv, name + "_backward")(y, x, w, **kw, backend="blas")
        x32 = x.astype(np.float32)
        getattr(tconv, name)(x32, w.astype(np.float32), **kw, backend="blas")
    print("valgrind driver: every primitive ran")


def main() -> int:
    if "--driver" in sys.argv:
        driver()
        return 0
    with tempfile.TemporaryDirectory(prefix="tconv-valgrind-") as tmp:
        env = {**os.environ, "PYTHONMALLOC": "malloc"}
        env.pop("LD_PRELOAD", None)
        env.pop("ASAN_OPTIONS", None)
        proc = subprocess.run(
            ["valgrind", "--leak-check=no", "--num-callers=40", f"--log-file={tmp}/vg.%p",
             sys.executable, os.path.abspath(__file__), "--driver"],
            env=env, capture_output=True, text=True,
        )
        print(proc.stdout.strip())
        ours, total = [], 0
        for path in glob.glob(f"{tmp}/vg.*"):
            for block in re.split(r"\n==\d+== \n", open(path, errors="replace").read()):
                if re.search(r"==\d+== (Invalid|Use of|Conditional|Syscall|Mismatched|Source and)", block):
                    total += 1
                    if OURS.search(block):
                        ours.append(block)
    for block in ours[:10]:
        print(block)
    print(f"valgrind: {len(ours)} report(s) in tconv's compiled code ({total} report contexts in all, "
          f"the others in CPython/NumPy/the loader)")
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
    return 0 if not ours and proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
