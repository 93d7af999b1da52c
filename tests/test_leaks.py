"""No leaks, bounded workspace (issue 7): memory stays flat and small.

Each public function (the 12 functions, the layers' forward and backward,
the shape functions) and a set of error paths is called many times on small
inputs, after a warm-up. Two meters, read after ``gc.collect()``:

* resident memory (psutil RSS) may grow by at most ``RSS_SLACK_MIB`` per
  function. The outputs are a few tens of KiB, so a leaked result or work
  buffer per call would show as tens of MiB;
* ``sys.getallocatedblocks()`` (Python objects alive) may not grow by more
  than a tenth of a block per call: a leaked reference per call shows.

CI runs ``CI_CALLS`` calls per function; ``-m slow`` runs the issue's 10,000
(``TCONV_LEAK_CALLS`` overrides) and prints the table of RSS before/after.

The workspace bound (SPEC: 64 MiB of extra memory per call) is measured on
the compiled backends in a fresh subprocess: the peak RSS of one decoder-size
call (whose naive im2col buffer would be 128 MiB) less its inputs and result.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import tconv

psutil = pytest.importorskip("psutil")

CI_CALLS = 600
SLOW_CALLS = int(os.environ.get("TCONV_LEAK_CALLS", "10000"))
WARMUP = 200
RSS_SLACK_MIB = 4.0


def _expect_error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError):
        return
    raise AssertionError("expected ValueError or TypeError")


def calls(backend: str):
    """(name, zero-argument callable): every public entry point, and error paths."""
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s)  # noqa: E731
    x1, w1, b = r(2, 4, 40), r(4, 6, 3), r(6)
    x2, w2 = r(2, 4, 12, 12), r(4, 6, 3, 3)
    x3, w3 = r(1, 4, 6, 6, 6), r(4, 6, 2, 2, 2)
    kw = dict(stride=2, padding=1, backend=backend)
    ct = {d: getattr(tconv, f"conv_transpose{d}d") for d in (1, 2, 3)}
    cv = {d: getattr(tconv, f"conv{d}d") for d in (1, 2, 3)}
    xs, ws = {1: x1, 2: x2, 3: x3}, {1: w1, 2: w2, 3: w3}
    wc = {d: r(6, 4, *(3,) * d) for d in (1, 2, 3)}
    dy_t = {d: r(*ct[d](xs[d], ws[d], **kw).shape) for d in (1, 2, 3)}
    dy_c = {d: r(*cv[d](xs[d], wc[d], **kw).shape) for d in (1, 2, 3)}
    out = []
    for d in (1, 2, 3):
        out += [
            (f"conv_transpose{d}d", lambda d=d: ct[d](xs[d], ws[d], b, **kw)),
            (f"conv{d}d", lambda d=d: cv[d](xs[d], wc[d], b, **kw)),
            (f"conv_transpose{d}d_backward", lambda d=d: getattr(tconv, f"conv_transpose{d}d_backward")(
                dy_t[d], xs[d], ws[d], **kw)),
            (f"conv{d}d_backward", lambda d=d: getattr(tconv, f"conv{d}d_backward")(dy_c[d], xs[d], wc[d], **kw)),
        ]
    layer = tconv.ConvTranspose2d(4, 6, 3, stride=2, padding=1, dtype=np.float64, rng=0)
    dy_layer = r(*layer(x2).shape)

    def layer_round_trip():
        layer(x2, backend=backend)
        layer.backward(dy_layer)

    conv_layer = tconv.Conv1d(4, 6, 3, padding=1, dtype=np.float32, rng=0)
    x1f = x1.astype(np.float32)
    dy_conv_layer = r(*conv_layer(x1f).shape).astype(np.float32)

    def conv_layer_round_trip():
        conv_layer(x1f, backend=backend)
        conv_layer.backward(dy_conv_layer)

    out += [
        ("ConvTranspose2d forward+backward", layer_round_trip),
        ("Conv1d forward+backward (float32)", conv_layer_round_trip),
        ("ConvTranspose3d construction", lambda: tconv.ConvTranspose3d(4, 6, 3, rng=0)),
        # error paths: rejected in validation, after the arrays were converted
        ("error: stride 0", lambda: _expect_error(ct[2], x2, w2, stride=0, backend=backend)),
        ("error: object array", lambda: _expect_error(ct[2], x2.astype(object), w2, backend=backend)),
        ("error: wrong bias shape", lambda: _expect_error(ct[2], x2, w2, r(5), backend=backend)),
        ("error: channel mismatch", lambda: _expect_error(cv[2], x2, r(6, 3, 3, 3), backend=backend)),
        ("error: unreachable output_size", lambda: _expect_error(ct[2], x2, w2, stride=2, output_size=(40, 40),
                                                                 backend=backend)),
        ("error: grad_output shape", lambda: _expect_error(tconv.conv_transpose2d_backward, r(2, 6, 5, 5), x2, w2,
                                                           backend=backend)),
        ("error: unknown backend", lambda: _expect_error(ct[1], x1, w1, backend="no-such-backend")),
        ("error: layer bad channels", lambda: _expect_error(tconv.Conv2d, 0, 4, 3)),
        ("error: list with a string", lambda: _expect_error(ct[1], [[[1.0, "a"]]], w1[:1], backend=backend)),
    ]
    return out


def shape_calls():
    return [
        ("shape.conv_transpose_output_size", lambda: tconv.shape.conv_transpose_output_size((7, 9), 4, 2, 1)),
        ("shape.conv_output_size", lambda: tconv.shape.conv_output_size((7, 9), 3, 2, "same")),
        ("shape.output_padding_for", lambda: tconv.shape.output_padding_for(7, 14, 3, 2, 1)),
        ("error: shape.output_padding_for unreachable",
         lambda: _expect_error(tconv.shape.output_padding_for, 7, 40, 3, 2, 1)),
    ]


def _meters():
    gc.collect()
    return psutil.Process().memory_info().rss, sys.getallocatedblocks()


def _grows(row, n_calls: int) -> bool:
    _, before, after, blocks = row
    return after - before > RSS_SLACK_MIB or blocks > n_calls // 10


def measure(entries, n_calls: int) -> list[tuple[str, float, float, int]]:
    """Per entry: (name, RSS MiB before, RSS MiB after, growth of allocated blocks).

    An entry that grows is measured once more: lazily built state (caches,
    thread pools) grows once and then stops, a leak grows on every pass.
    """
    rows = []
    for name, fn in entries:
        for _ in range(WARMUP):
            fn()
        for _ in range(2):
            rss0, blocks0 = _meters()
            for _ in range(n_calls):
                fn()
            rss1, blocks1 = _meters()
            row = (name, rss0 / 2**20, rss1 / 2**20, blocks1 - blocks0)
            if not _grows(row, n_calls):
                break
        rows.append(row)
    return rows


def check(rows, n_calls: int) -> None:
    bad = [
        f"{name}: RSS {before:.1f} -> {after:.1f} MiB, {blocks:+d} Python blocks over {n_calls} calls"
        for name, before, after, blocks in rows
        if _grows((name, before, after, blocks), n_calls)
    ]
    assert not bad, "memory grows with calls (twice in a row):\n" + "\n".join(bad)


def report(rows, label, capsys):
    with capsys.disabled():
        print(f"\n[tconv leaks] {label}")
        for name, before, after, blocks in rows:
            print(f"  {name:<45} RSS {before:8.1f} -> {after:8.1f} MiB ({after - before:+.2f}), blocks {blocks:+d}")


def test_repeated_calls_leave_memory_flat(backend_name):
    rows = measure(calls(backend_name), CI_CALLS)
    check(rows, CI_CALLS)


def test_shape_functions_leave_memory_flat():
    rows = measure(shape_calls(), CI_CALLS)
    check(rows, CI_CALLS)


@pytest.mark.slow
def test_ten_thousand_calls_leave_memory_flat(backend_name, capsys):
    first, _ = _meters()
    rows = measure(calls(backend_name) + shape_calls(), SLOW_CALLS)
    last, _ = _meters()
    report(rows, f"backend {backend_name}, {SLOW_CALLS} calls each; whole run RSS "
                 f"{first / 2**20:.1f} -> {last / 2**20:.1f} MiB", capsys)
    check(rows, SLOW_CALLS)


# --------------------------------------------------------------------------- #
# the workspace bound: 64 MiB of extra memory per call, whatever the layer
# --------------------------------------------------------------------------- #
WORKSPACE_MIB = 64
WORKSPACE_SLACK_MIB = 16  # allocator rounding, BLAS's own packing buffers

_PEAK_SCRIPT = r"""
import gc, json, resource, sys
import numpy as np
import psutil
sys.path.insert(0, sys.argv[2])
import tconv
backend = sys.argv[1]
rng = np.random.default_rng(0)
small = rng.standard_normal((1, 8, 8, 8), dtype=np.float32)
tconv.conv_transpose2d(small, rng.standard_normal((8, 8, 4, 4), dtype=np.float32), stride=2, backend=backend)
tconv.conv2d(small, rng.standard_normal((8, 8, 3, 3), dtype=np.float32), backend=backend)
# a decoder layer whose naive im2col/col2im buffer would be 128 MiB (float32)
x = rng.standard_normal((8, 64, 64, 64), dtype=np.float32)
w = rng.standard_normal((64, 64, 4, 4), dtype=np.float32)
gc.collect()
rss0 = psutil.Process().memory_info().rss
peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = tconv.conv_transpose2d(x, w, stride=2, padding=1, backend=backend)
peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
grad = tconv.conv_transpose2d_backward(out, x, w, stride=2, padding=1, needs=("input",), backend=backend)[0]
peak2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(rss0=rss0, peak0=peak0, peak_forward=peak1, peak_backward=peak2,
                      out_bytes=out.nbytes, grad_bytes=grad.nbytes)))
"""


def _workspace_bytes(backend: str) -> dict:
    import json
    import subprocess

    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, backend, root], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    base = max(m["rss0"], m["peak0"])
    m["forward_extra"] = m["peak_forward"] - base - m["out_bytes"]
    m["backward_extra"] = m["peak_backward"] - max(base + m["out_bytes"], m["peak_forward"]) - m["grad_bytes"]
    return m


@pytest.mark.parametrize("backend", ["blas", "openmp"])
def test_workspace_stays_within_64_mib(backend, require, capsys):
    """Peak memory of one big call, less its inputs and result, is within SPEC's 64 MiB (compiled backends)."""
    if backend == "blas":
        require(backend)  # a core backend: skipped locally, a failure under CI
    elif backend not in [b.name for b in tconv.list_backends() if b.available]:
        pytest.skip(f"plugin backend {backend!r} is not available here")
    m = _workspace_bytes(backend)
    with capsys.disabled():
        print(f"\n[tconv workspace] {backend}: forward +{m['forward_extra'] / 2**20:.1f} MiB, "
              f"backward (grad_x) +{m['backward_extra'] / 2**20:.1f} MiB beyond inputs and results")
    limit = (WORKSPACE_MIB + WORKSPACE_SLACK_MIB) * 2**20
    assert m["forward_extra"] <= limit, f"forward used {m['forward_extra'] / 2**20:.1f} MiB of workspace"
    assert m["backward_extra"] <= limit, f"backward used {m['backward_extra'] / 2**20:.1f} MiB of workspace"
