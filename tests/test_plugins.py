"""The plugin mechanism and the two in-repo plugins (``backends/openmp``, ``backends/cupy``).

Selection is checked in fresh interpreters (``TCONV_BACKEND`` is read by the
process), a broken plugin through a real entry point in a throwaway
dist-info, and the OpenMP backend's promises directly: every plan path
agrees with the reference, results are bitwise the same for any thread
count, BLAS runs single-threaded under it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

import tconv
from tconv.backend import Geometry
from tconv import registry
from tconv._numpy_backend import NumpyBackend

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = [ROOT / "backends" / "openmp", ROOT / "backends" / "cupy"]


def _infos() -> dict:
    return {info.name: info for info in tconv.list_backends()}


def _run(code: str, extra_path=(), **env_vars) -> str:
    """Run ``code`` in a fresh interpreter (no inherited TCONV_* settings); its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCONV_")}
    path = [*map(str, extra_path), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env.update(env_vars)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


SELECT = """
import numpy as np, tconv
try:
    name = tconv.get_backend()
    out = tconv.conv_transpose2d(np.ones((1, 1, 2, 2)), np.ones((1, 1, 3, 3)))
    print("OK", name, type(out).__module__, float(out.sum()))
except tconv.BackendError as exc:
    print("ERROR", exc)
"""


# --------------------------------------------------------------------------- #
# selection and defaults, in fresh interpreters
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", sorted(_infos()))
def test_tconv_backend_selects_each_backend_or_says_why_not(name):
    info = _infos()[name]
    line = _run(SELECT, TCONV_BACKEND=name)
    if info.available:
        # 4 input cells x 9 taps of ones: 36, whichever backend computes it
        assert line == f"OK {name} numpy 36.0", line
    else:
        assert line.startswith("ERROR") and name in line and info.reason in line, line


def test_tconv_backend_unknown_name_lists_the_available_ones():
    line = _run(SELECT, TCONV_BACKEND="no-such-backend")
    assert line.startswith("ERROR") and "no-such-backend" in line
    for name, info in _infos().items():
        if info.available:
            assert name in line


def test_default_is_openmp_when_installed_and_never_cupy():
    infos = _infos()
    name = _run(SELECT).split()[1]
    assert name != "cupy"
    if infos.get("openmp") is not None and infos["openmp"].available:
        assert name == "openmp"
    elif infos.get("blas") is not None and infos["blas"].available:
        assert name == "blas"


def test_an_available_gpu_backend_is_still_never_chosen_implicitly(restore_backend_choice):
    """cupy's default_priority is None: even where it can run, it is used only when asked for."""
    cupy_backend = pytest.importorskip("tconv_cupy").CupyBackend
    assert cupy_backend.default_priority is None

    class AvailableCupy(cupy_backend):
        def availability(self):
            return True, ""

    registry.register_backend(AvailableCupy(), name="cupy")
    try:
        assert tconv.get_backend() != "cupy"
    finally:
        registry.reload_backends()


@pytest.mark.parametrize("dist, name, target", [
    ("tconv-openmp", "openmp", "tconv_openmp:OpenMPBackend"),
    ("tconv-cupy", "cupy", "tconv_cupy:CupyBackend"),
])
def test_installed_plugins_register_through_the_entry_point_group(dist, name, target):
    found = {ep.name: ep for ep in entry_points(group=registry.ENTRY_POINT_GROUP)}
    if name not in found:
        pytest.skip(f"{dist} is not installed (pip install ./backends/{name})")
    assert found[name].value == target
    assert name in _infos()


@pytest.mark.parametrize("source", PLUGIN_SOURCES, ids=lambda p: p.name)
def test_plugin_distributions_declare_their_entry_point(source):
    text = (source / "pyproject.toml").read_text()
    assert '[project.entry-points."tconv.backends"]' in text
    assert "cupy-cuda" not in text.split("[project.optional-dependencies]")[0], \
        "CuPy must be an extra, not a hard dependency"


# --------------------------------------------------------------------------- #
# a plugin that raises on import, through a real entry point
# --------------------------------------------------------------------------- #
BROKEN_PROBE = """
import numpy as np, tconv
info = {i.name: i for i in tconv.list_backends()}["broken"]
print("LISTED", info.available, info.reason)
print("STILL", tconv.get_backend() != "broken",
      float(tconv.conv_transpose1d(np.ones((1, 1, 2)), np.ones((1, 1, 2))).sum()))
try:
    tconv.set_backend("broken")
except tconv.BackendError as exc:
    print("REFUSED", exc)
"""


def test_a_plugin_that_raises_on_import_is_listed_with_its_error(tmp_path):
    package = tmp_path / "tconv_broken_plugin"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("the broken plugin exploded")\n')
    dist_info = tmp_path / "tconv_broken_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: tconv-broken-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[tconv.backends]\nbroken = tconv_broken_plugin:Backend\n")
    lines = _run(BROKEN_PROBE, extra_path=[tmp_path]).splitlines()
    listed, still, refused = lines[-3], lines[-2], lines[-1]
    assert listed.startswith("LISTED False") and "the broken plugin exploded" in listed, listed
    assert "RuntimeError" in listed
    assert still == "STILL True 4.0", still
    assert refused.startswith("REFUSED") and "broken" in refused and "exploded" in refused


# --------------------------------------------------------------------------- #
# the OpenMP backend
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def openmp(plugin):
    plugin("openmp")  # skipped where not installed (CI's core-only run), failing under CI if broken
    import tconv_openmp

    return tconv_openmp


def _case(rng, ndim, n, c_in, c_out, groups, size, kernel, stride, dilation, dtype=np.float64):
    """Arrays for a transposed and a regular convolution on the same input."""
    x = rng.standard_normal((n, c_in) + (size,) * ndim).astype(dtype)
    w = rng.standard_normal((c_in, c_out // groups) + (kernel,) * ndim).astype(dtype)
    wc = rng.standard_normal((c_out, c_in // groups) + (kernel,) * ndim).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype)
    return x, w, wc, b, dict(stride=stride, padding=1, dilation=dilation, groups=groups)


def _all_primitives(x, w, wc, b, kw, ndim, backend):
    """Forward and the input and weight gradients of the transposed and the regular convolution."""
    ct = getattr(tconv, f"conv_transpose{ndim}d")
    ctb = getattr(tconv, f"conv_transpose{ndim}d_backward")
    cv = getattr(tconv, f"conv{ndim}d")
    cvb = getattr(tconv, f"conv{ndim}d_backward")
    y = ct(x, w, b, **kw, backend=backend)
    dy = np.cos(np.arange(y.size)).astype(y.dtype).reshape(y.shape)
    z = cv(x, wc, b, **kw, backend=backend)
    dz = np.sin(np.arange(z.size)).astype(z.dtype).reshape(z.shape)
    needs = ("input", "weight")
    return [y, *ctb(dy, x, w, **kw, needs=needs, backend=backend)[:2],
            z, *cvb(dz, x, wc, **kw, needs=needs, backend=backend)[:2]]


# Each forces one path of the plan (budgets in float64 elements of the
# transposed forward call; the other calls take whatever path that gives).
G, N, C_IN, C_OUT = 2, 5, 4, 6
SIZE = {1: 9, 2: 5, 3: 4}


TWO_PHASE = dict(MIN_DIRECT_TASKS=10**9)  # scatter without enough direct tasks


def _plan_path(path: str, ndim: int) -> dict:
    taps, cells = 3**ndim, SIZE[ndim] ** ndim
    folded = dict(MIN_FOLDED_TASKS=1, TARGET_WIDTH=2 * cells + 1, INTERLEAVE_MIN_SAMPLES=10**9)
    tiles = dict(FOLD_BELOW=0, MIN_TILE=7, TARGET_WIDTH=7, TARGET_TASKS=10**6, PHASED_MAX_BYTES=0)
    return {
        # 2-3 samples per GEMM, the last tile partial (direct scatter: phased col2im)
        "folded": folded,
        "folded_unphased": {**folded, "PHASED_MAX_BYTES": 0},
        # one whole sample per GEMM, phased col2im
        "whole_samples": dict(FOLD_BELOW=0, TARGET_WIDTH=7),
        # the same, columns sample-minor (direct scatter)
        "folded_interleaved": {**folded, "INTERLEAVE_MIN_SAMPLES": 2},
        "folded_two_phase": {**folded, **TWO_PHASE},
        # slices of one sample, the last one partial
        "column_tiles": tiles,
        "column_tiles_two_phase": {**tiles, **TWO_PHASE},
        # direct scatter: output channels in blocks of 2 (the last one partial)
        "channel_blocks": dict(MIN_GEMM_ROWS=1, FOLD_BELOW=0, DIRECT_TASKS=(C_OUT // G) * G * N // 2),
        # im2col rows in several GEMMs; weight_grad column tiles of 2
        "row_chunks": dict(THREAD_WORKSPACE_BYTES=8 * 20, FOLD_BELOW=0, MIN_TILE=4),
        # scatter's shared buffer: one channel at a time, or a third of the cells
        "chunk_by_channels": dict(SHARED_WORKSPACE_BYTES=8 * G * taps * cells, **TWO_PHASE),
        "chunk_by_cells": dict(SHARED_WORKSPACE_BYTES=8 * G * taps * max(1, cells // 3), **TWO_PHASE),
        # weight_grad: one im2col row per task
        "small_blocks": dict(MIN_ROW_BLOCK=1, MAX_ROW_BLOCK=1, TARGET_ROW_BLOCKS=10**6),
    }[path]


PATHS = ["folded", "folded_unphased", "whole_samples", "folded_interleaved", "folded_two_phase", "column_tiles",
         "column_tiles_two_phase", "channel_blocks", "row_chunks", "chunk_by_channels", "chunk_by_cells", "small_blocks"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])  # (float32: the tasks' GEMMs through the core's)
def test_openmp_every_plan_path_agrees_with_numpy(openmp, monkeypatch, restore_threads, path, ndim, dtype,
                                                  assert_close):
    from tconv_openmp import _plan

    for attr, value in _plan_path(path, ndim).items():
        assert hasattr(_plan, attr), attr
        monkeypatch.setattr(_plan, attr, value)
    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    tconv.set_num_threads(2)
    rng = np.random.default_rng(ndim)
    arrays = _case(rng, ndim, n=N, c_in=C_IN, c_out=C_OUT, groups=G, size=SIZE[ndim], kernel=3,
                   stride=2, dilation=1, dtype=dtype)
    expected = _all_primitives(*arrays, ndim, "numpy")
    got = _all_primitives(*arrays, ndim, "openmp")
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        assert_close(g, e)


@pytest.mark.parametrize("path", ["folded", "whole_samples"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_openmp_phased_col2im_adds_in_the_plain_order(openmp, monkeypatch, restore_threads, path, ndim):
    """The phase-major accumulator starts at the bias and adds the taps in
    col2im_add_tile's order: the same bits as without it."""
    from tconv_openmp import _plan

    for attr, value in _plan_path(path, ndim).items():
        monkeypatch.setattr(_plan, attr, value)
    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    tconv.set_num_threads(2)
    x, w, _, b, _ = _case(np.random.default_rng(ndim), ndim, n=N, c_in=C_IN, c_out=C_OUT, groups=G,
                       size=SIZE[ndim], kernel=3, stride=2, dilation=2, dtype=np.float32)
    call = getattr(tconv, f"conv_transpose{ndim}d")
    kw = dict(stride=2, padding=1, output_padding=1, dilation=2, groups=G, backend="openmp")
    phased = call(x, w, b, **kw)
    monkeypatch.setattr(_plan, "PHASED_MAX_BYTES", 0)
    if path == "whole_samples":  # the same tiles without it: whole samples still
        monkeypatch.setattr(_plan, "TARGET_WIDTH", 10**6)
    assert np.array_equal(call(x, w, b, **kw), phased)


@pytest.mark.parametrize("path", ["folded", "column_tiles"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_openmp_three_taps_at_once_add_in_the_plain_order(openmp, monkeypatch, restore_threads, path, ndim,
                                                          dilation, assert_close):
    """At stride 1 with a 3-wide kernel col2im_add_tile adds a line's three taps in one
    pass, in tap order: numpy's values, and folded, the bits of the phased accumulator."""
    from tconv_openmp import _plan

    for attr, value in _plan_path(path, ndim).items():
        monkeypatch.setattr(_plan, attr, value)
    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    tconv.set_num_threads(2)
    x, w, _, b, kw = _case(np.random.default_rng(ndim), ndim, n=N, c_in=C_IN, c_out=C_OUT, groups=G,
                           size=SIZE[ndim], kernel=3, stride=1, dilation=dilation, dtype=np.float32)
    call = getattr(tconv, f"conv_transpose{ndim}d")
    phased = call(x, w, b, **kw, backend="openmp")
    monkeypatch.setattr(_plan, "PHASED_MAX_BYTES", 0)
    got = call(x, w, b, **kw, backend="openmp")
    assert path != "folded" or np.array_equal(got, phased)
    assert_close(got, call(x, w, b, **kw, backend="numpy"))


def test_openmp_widens_tiles_to_whole_samples_for_phased_col2im_only_past_stride_one(openmp):
    """At stride 1 the taps' runs are contiguous already: tiles keep TARGET_WIDTH columns."""
    from tconv_openmp import _plan

    cells = 56 * 56
    for stride, phased, tile in ((2, True, cells), (1, False, _plan.TARGET_WIDTH)):
        acc = 56 * stride * -(-56 // stride)  # one channel, rows padded to whole phases
        plan = _plan.scatter_plan(1, 1, 64, 64, 9, cells, 56 * 56, 4, acc, stride)
        assert plan.direct and plan.phased == phased and plan.tiling.tile == tile, (stride, plan)


def test_openmp_exact_cover_takes_fewer_larger_gemms(openmp, monkeypatch, restore_threads, assert_close):
    """Taps that cover the image exactly (k2 s2) leave no col2im adds to share out:
    direct tasks of twice the channels, and the same result as the numpy backend."""
    from tconv_openmp import _plan

    q, cells = 64, 16 * 16
    blocks = [_plan.scatter_plan(1, 1, 32, q, 4, cells, 4 * cells, 8, 0, 2, exact).block for exact in (False, True)]
    assert blocks[1] == 2 * blocks[0] and q // blocks[1] >= 2, blocks
    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((1, 32, 16, 16)), rng.standard_normal((32, q, 2, 2)), rng.standard_normal(q)
    tconv.set_num_threads(2)
    geom = Geometry(image=(1, 32, 32), grid=(1, 16, 16), kernel=(1, 2, 2), stride=(1, 2, 2), dilation=(1, 1, 1),
                    pad_begin=(0, 0, 0), groups=1)
    described = openmp.backend.OpenMPBackend().describe_plan(
        "scatter", x.reshape(1, 32, 1, 16, 16), w.reshape(32, q, 1, 2, 2), None, geom)
    assert described.startswith(f"openmp col2im, direct tasks of {blocks[1]} output channels"), described
    assert_close(tconv.conv_transpose2d(x, w, b, stride=2, backend="openmp"),
                 tconv.conv_transpose2d(x, w, b, stride=2, backend="numpy"))


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_openmp_plan_paths_are_really_taken(openmp, monkeypatch, ndim):
    """Each budget above cuts the transposed forward call (and its gradients) as its name says."""
    from tconv_openmp import _plan

    p, q, taps, cells = C_IN // G, C_OUT // G, 3**ndim, SIZE[ndim] ** ndim
    image_cells = (2 * SIZE[ndim] - 1) ** ndim  # stride 2, kernel 3, padding 1
    image = (1,) * (3 - ndim) + (2 * SIZE[ndim] - 1,) * ndim

    def plans(path):
        with monkeypatch.context() as patch:
            for attr, value in _plan_path(path, ndim).items():
                patch.setattr(_plan, attr, value)
            return (_plan.scatter_plan(N, G, p, q, taps, cells, image_cells, 8,
                                       image[0] * image[1] * 2 * -(-image[2] // 2), 2),
                    _plan.gather_plan(N, G, q * taps, p, cells, q * image_cells, 8),
                    _plan.weight_grad_plan(N, G, q * taps, p, cells, taps, image_cells, 8))

    scatter, gather, grad = plans("folded")
    assert scatter.direct and scatter.tiling.fold > 1 and N % scatter.tiling.fold
    assert not scatter.interleaved and scatter.phased
    assert gather.tiling.fold > 1 and grad.tiling.fold > 1
    assert not gather.interleaved and not grad.interleaved
    scatter, gather, grad = plans("folded_unphased")
    assert scatter.direct and scatter.tiling.fold > 1 and not scatter.interleaved and not scatter.phased
    scatter, gather, grad = plans("whole_samples")
    assert scatter.direct and scatter.phased and scatter.tiling.fold == 1 and scatter.tiling.tile == cells
    scatter, gather, grad = plans("folded_interleaved")
    assert scatter.direct and scatter.interleaved and N % scatter.tiling.fold
    assert gather.interleaved and grad.interleaved and gather.tiling.fold > 1 and grad.tiling.fold > 1
    scatter, gather, grad = plans("folded_two_phase")
    assert not scatter.direct and scatter.tiling.fold > 1 and scatter.samples % scatter.tiling.fold
    for path in ("column_tiles", "column_tiles_two_phase"):
        scatter, gather, grad = plans(path)
        assert scatter.direct == (path == "column_tiles") and scatter.tiling.fold == 1 and not scatter.phased
        assert cells % scatter.tiling.tile and scatter.tiling.tile < cells
        assert gather.tiling.fold == 1 and cells % gather.tiling.tile
    scatter, gather, grad = plans("channel_blocks")
    assert scatter.direct and scatter.block == 2 and q % 2
    scatter, gather, grad = plans("row_chunks")
    assert gather.rows < q * taps and grad.tiling.tile < cells
    scatter, gather, grad = plans("chunk_by_channels")
    assert scatter.samples == 1 and scatter.channels < q and scatter.cells == cells
    scatter, gather, grad = plans("chunk_by_cells")
    assert scatter.channels == 1 and scatter.cells < cells
    scatter, gather, grad = plans("small_blocks")
    assert grad.rows == 1
    assert image_cells > cells


# column tiles; folded samples in sample-minor order; a wide kernel (the
# core's "patches" route, GEMMs threaded by BLAS)
BITWISE_CASES = {
    "tiles": dict(n=6, c_in=12, c_out=8, size=11, kernel=3, stride=2, dilation=2),
    "sample_minor": dict(n=20, c_in=8, c_out=8, size=4, kernel=4, stride=2, dilation=1),
    "wide_kernel": dict(n=2, c_in=8, c_out=8, size=9, kernel=9, stride=4, dilation=1),
}


@pytest.mark.parametrize("shape", sorted(BITWISE_CASES))
def test_openmp_results_are_bitwise_equal_across_runs_and_thread_counts(openmp, monkeypatch,
                                                                       restore_threads, shape):
    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    rng = np.random.default_rng(7)
    arrays = _case(rng, 2, groups=2, dtype=np.float32, **BITWISE_CASES[shape])
    runs = []
    for threads in (2, 3, 2):
        tconv.set_num_threads(threads)
        runs.append(_all_primitives(*arrays, 2, "openmp"))
    for run in runs[1:]:
        for a, c in zip(runs[0], run):
            assert np.array_equal(a, c)


def test_openmp_bits_do_not_depend_on_the_callers_last_blas_call(openmp, restore_threads):
    """The core's GEMM path is chosen per thread (``set_gemm_threads``): a ``blas`` call at 2
    threads leaves the calling thread on threaded BLAS; the openmp tasks that thread then
    runs must still take the core's kernel like the OpenMP workers' (same bits as before)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((16, 64, 8, 8)).astype(np.float32)
    w = rng.standard_normal((64, 48, 4, 4)).astype(np.float32)
    wc = rng.standard_normal((48, 64, 4, 4)).astype(np.float32)
    tconv.set_num_threads(2)
    kw = dict(stride=2, padding=1)
    first = (tconv.conv_transpose2d(x, w, **kw, backend="openmp"), tconv.conv2d(x, wc, backend="openmp"))
    tconv.conv_transpose2d(x, w, **kw, backend="blas")  # (this thread: BLAS at 2 threads)
    again = (tconv.conv_transpose2d(x, w, **kw, backend="openmp"), tconv.conv2d(x, wc, backend="openmp"))
    for a, b in zip(first, again):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("n", [1, 3])
def test_openmp_small_pairs_run_their_gradients_side_by_side(openmp, monkeypatch, restore_threads, n,
                                                             assert_close):
    """A pair too small for batch parts runs the core's gather and weight_grad on two
    threads at once: the definition's gradients, and the core's bits (as at one
    thread) whatever the thread count."""
    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 6, 5, 4)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    kwargs = dict(stride=2, padding=1, output_padding=1, needs=("input", "weight"))
    dy = rng.standard_normal((n, 4, 10, 8)).astype(np.float32)
    tconv.set_num_threads(1)
    core = tconv.conv_transpose2d_backward(dy, x, w, **kwargs, backend="blas")[:2]
    for got, want in zip(core, tconv.conv_transpose2d_backward(dy, x, w, **kwargs, backend="numpy")[:2]):
        assert_close(got, want)
    for threads in (2, 3):
        tconv.set_num_threads(threads)
        for got, want in zip(tconv.conv_transpose2d_backward(dy, x, w, **kwargs, backend="openmp")[:2], core):
            assert np.array_equal(got, want)


def test_openmp_heavy_weight_pairs_run_side_by_side_at_two_threads(openmp, monkeypatch, restore_threads,
                                                                    assert_close):
    """A pair whose weight passes ``SIDE_BY_SIDE_MIN_WEIGHT_BYTES`` runs its two gradients
    side by side at exactly two threads (the core's bits, as at one thread), and in
    batch parts at three."""
    _pairs_in_parts(openmp, monkeypatch)
    monkeypatch.setattr(openmp.backend, "SIDE_BY_SIDE_MAX_MACS", 0)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 6, 4, 4)).astype(np.float32)
    w = rng.standard_normal((6, 5, 4, 4)).astype(np.float32)
    dy = rng.standard_normal((8, 5, 8, 8)).astype(np.float32)
    kwargs = dict(stride=2, padding=1, needs=("input", "weight"))
    tconv.set_num_threads(1)
    core = tconv.conv_transpose2d_backward(dy, x, w, **kwargs, backend="blas")[:2]
    from tconv._args import prepare

    call = prepare(transposed=True, ndim=2, x=x, weight=w, stride=2, padding=1, grad_output=dy, backward=True,
                   backend="openmp")
    backend, geom_args = call.backend, (call.grad_output, call.weight, call.x, call.geom)
    for threshold, threads, described in [(w.nbytes, 2, "side by side"), (w.nbytes, 3, "batch parts"),
                                          (w.nbytes + 1, 2, "batch parts")]:
        monkeypatch.setattr(openmp.backend, "SIDE_BY_SIDE_MIN_WEIGHT_BYTES", threshold)
        tconv.set_num_threads(threads)
        assert described in backend.describe_plan("gather_and_weight_grad", *geom_args)
        got = tconv.conv_transpose2d_backward(dy, x, w, **kwargs, backend="openmp")[:2]
        for g, c in zip(got, core):
            if described == "side by side":
                assert np.array_equal(g, c)
            else:
                assert_close(g, c)


def _pairs_in_parts(openmp, monkeypatch) -> None:
    """Every backward pair, however small, runs in the openmp backend's batch parts."""
    from tconv_openmp import _plan

    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(_plan, "PAIR_MIN_PART_MACS", 1)
    monkeypatch.setattr(_plan, "PAIR_MIN_PART_COLUMNS", 1)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_openmp_backward_pair_in_batch_parts(openmp, monkeypatch, restore_threads, ndim, dtype, assert_close):
    """Large backward pairs run in batch parts on a thread pool: the definition's
    gradients, the same bits at any thread count from 2 up, the weight gradient
    summed in part order, and every part's buffers released with the backend's."""
    from tconv_openmp import _plan

    _pairs_in_parts(openmp, monkeypatch)
    rng = np.random.default_rng(ndim)
    n, parts = 7, _plan.PAIR_MAX_PARTS
    x = rng.standard_normal((n, 6) + (5,) * ndim).astype(dtype)
    w = rng.standard_normal((6, 2) + (3,) * ndim).astype(dtype)
    kw = dict(stride=2, padding=1, output_padding=1, groups=2)
    ctb = getattr(tconv, f"conv_transpose{ndim}d_backward")
    dy = rng.standard_normal(getattr(tconv, f"conv_transpose{ndim}d")(x, w, **kw).shape).astype(dtype)
    runs = []
    for threads in (2, 3, 2):
        tconv.set_num_threads(threads)
        runs.append(ctb(dy, x, w, **kw, needs=("input", "weight"), backend="openmp")[:2])
    for run in runs[1:]:
        assert all(np.array_equal(a, c) for a, c in zip(runs[0], run))
    expected = ctb(dy, x, w, **kw, needs=("input", "weight"), backend="numpy")[:2]
    for got, want in zip(runs[0], expected):
        assert got.dtype == dtype
        assert_close(got, want)
    # the weight gradient is the parts' (each the core's, on its samples) summed in order
    bounds = [n * i // parts for i in range(parts + 1)]
    tconv.set_num_threads(1)  # the parts' BLAS runs on one thread
    part_sums = [ctb(dy[a:b], x[a:b], w, **kw, needs=("weight",), backend="blas")[1]
                 for a, b in zip(bounds, bounds[1:])]
    total = part_sums[0].copy()
    for part in part_sums[1:]:
        total += part
    assert np.array_equal(runs[0][1], total)
    openmp.OpenMPBackend().release_workspace()  # (reaches every pool thread; must not hang)


def test_openmp_backward_pair_in_batch_parts_keeps_nan_and_inf_masks(openmp, monkeypatch, restore_threads):
    """A part with a non-finite weight or input takes the tap-by-tap path, as two calls would."""
    _pairs_in_parts(openmp, monkeypatch)
    tconv.set_num_threads(2)
    rng = np.random.default_rng(0)
    x, w, dy = rng.standard_normal((8, 6, 5, 5)), rng.standard_normal((6, 4, 3, 3)), rng.standard_normal((8, 4, 9, 9))
    w[1, 2, 0, 0] = np.nan
    x[3, 1, 2, 2] = np.inf
    got = tconv.conv_transpose2d_backward(dy, x, w, stride=2, padding=1, backend="openmp")
    want = tconv.conv_transpose2d_backward(dy, x, w, stride=2, padding=1, backend="numpy")
    for g, e in zip(got, want):
        assert np.array_equal(np.isnan(g), np.isnan(e)) and np.array_equal(np.isposinf(g), np.isposinf(e))
        assert np.array_equal(np.isneginf(g), np.isneginf(e))
        finite = np.isfinite(e)
        np.testing.assert_allclose(g[finite], e[finite], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("transposed", [True, False])
def test_openmp_weight_gradient_keeps_nan_masks_of_border_cells(openmp, monkeypatch, restore_threads, transposed):
    """The plugin's own weight gradient, with a NaN on the grid side at a border cell
    (some of its taps leave the image), gives the definition's NaN entries: its
    result is checked and, not finite, computed again tap by tap."""
    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    tconv.set_num_threads(2)
    rng = np.random.default_rng(1)
    if transposed:  # the grid side is x
        x, w, dy = rng.standard_normal((4, 6, 5, 5)), rng.standard_normal((6, 4, 3, 3)), rng.standard_normal((4, 4, 9, 9))
        x[2, 1, 0, 4] = np.nan
        run = lambda backend: tconv.conv_transpose2d_backward(dy, x, w, stride=2, padding=1, needs=("weight",),
                                                              backend=backend)[1]
    else:  # the grid side is grad_output
        x, w, dy = rng.standard_normal((4, 6, 9, 9)), rng.standard_normal((4, 6, 3, 3)), rng.standard_normal((4, 4, 5, 5))
        dy[2, 1, 0, 4] = np.nan
        run = lambda backend: tconv.conv2d_backward(dy, x, w, stride=2, padding=1, needs=("weight",),
                                                    backend=backend)[1]
    got, want = run("openmp"), run("numpy")
    assert np.isnan(want).any() and not np.isnan(want).all()
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-10, atol=1e-10)


def test_openmp_pair_helpers_stay_off_the_callers_cpu(openmp, monkeypatch, restore_threads):
    """After a backward pair in batch parts, every pool helper may run on any of the
    process's CPUs but the one the calling thread was on (Linux; elsewhere nothing is set)."""
    off = openmp.backend._helpers_off_caller_cpu
    if off._getcpu is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs sched_getcpu, sched_setaffinity and two CPUs")
    _pairs_in_parts(openmp, monkeypatch)
    tconv.set_num_threads(2)
    rng = np.random.default_rng(0)
    x, w, dy = rng.standard_normal((8, 6, 5, 5)), rng.standard_normal((6, 4, 3, 3)), rng.standard_normal((8, 4, 9, 9))
    got = tconv.conv_transpose2d_backward(dy, x, w, stride=2, padding=1, backend="openmp")
    want = tconv.conv_transpose2d_backward(dy, x, w, stride=2, padding=1, backend="numpy")
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10)
    assert off._helpers and off._caller_cpu >= 0
    for tid in off._helpers:
        assert os.sched_getaffinity(tid) == off._allowed - {off._caller_cpu}


def test_openmp_backward_pairs_while_the_budget_changes(openmp, monkeypatch, restore_threads):
    """Batch parts keep their pool when another thread changes the thread budget meanwhile;
    results stay those of any count from 2 up."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    _pairs_in_parts(openmp, monkeypatch)
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((8, 6, 5, 5)), rng.standard_normal((6, 4, 3, 3))
    dy = rng.standard_normal((8, 4, 11, 11))
    tconv.set_num_threads(2)
    expected = tconv.conv_transpose2d_backward(dy, x, w, stride=2, backend="openmp")
    stop = threading.Event()

    def fiddle():
        n = 2
        while not stop.is_set():
            tconv.set_num_threads(n)
            n = 5 - n  # 2, 3, 2, ...

    fiddler = threading.Thread(target=fiddle)
    fiddler.start()
    try:
        with ThreadPoolExecutor(4) as callers:
            results = list(callers.map(
                lambda _: tconv.conv_transpose2d_backward(dy, x, w, stride=2, backend="openmp"), range(40)))
    finally:
        stop.set()
        fiddler.join()
    for got in results:
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_openmp_runs_the_core_kernels_at_one_thread(openmp, monkeypatch, restore_threads, assert_close):
    """One thread: the ``blas`` backend's results, bit for bit; they agree with 2 threads to rounding."""
    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    arrays = _case(np.random.default_rng(3), 2, groups=2, dtype=np.float32, **BITWISE_CASES["tiles"])
    tconv.set_num_threads(1)
    one_thread = _all_primitives(*arrays, 2, "openmp")
    for a, c in zip(one_thread, _all_primitives(*arrays, 2, "blas")):
        assert np.array_equal(a, c)
    tconv.set_num_threads(2)
    for a, c in zip(one_thread, _all_primitives(*arrays, 2, "openmp")):
        assert_close(c, a)


# (x shape, weight shape, stride): each of the routes a transposed convolution can take
ROUTE_SHAPES = {
    "col2im": ((2, 8, 9, 9), (8, 8, 3, 3), 2),
    "one-cell grid": ((4, 16, 1, 1), (16, 32, 4, 4), 1),
    "wide kernel (patches)": ((1, 4, 3, 3), (4, 4, 16, 16), 8),
    "one sample, exact cover": ((1, 32, 16, 16), (32, 16, 2, 2), 2),
    "small": ((1, 1, 2, 2), (1, 1, 3, 3), 1),
}


@pytest.mark.parametrize("route", ROUTE_SHAPES)
def test_openmp_never_threads_blas(openmp, restore_threads, route):
    """Every call leaves BLAS at one thread, whichever kernels ran: a threaded OpenBLAS
    keeps its workers spinning after the call, on the cores OpenMP needs next."""
    from threadpoolctl import threadpool_info

    from tconv import _threads

    x_shape, w_shape, stride = ROUTE_SHAPES[route]
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    tconv.set_num_threads(2)
    y = tconv.conv_transpose2d(x, w, stride=stride)
    for call in (lambda: tconv.conv_transpose2d(x, w, stride=stride, backend="openmp"),
                 lambda: tconv.conv_transpose2d_backward(y, x, w, stride=stride, backend="openmp")):
        _threads.set_blas_threads(2)
        call()
        blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
        assert blas and all(lib["num_threads"] == 1 for lib in blas), blas


def test_openmp_backward_batch_parts_leave_blas_at_one_thread(openmp, monkeypatch, restore_threads):
    """The batch parts run partly on pool threads, whose BLAS thread setting OpenBLAS ignores
    (only the main thread's counts): the calling thread sets it, even right after the
    ``blas`` backend set it to two (which once left the parts' GEMMs threaded, 2.5x slower)."""
    from threadpoolctl import threadpool_info

    _pairs_in_parts(openmp, monkeypatch)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 8, 9, 9)), rng.standard_normal((8, 8, 3, 3))
    tconv.set_num_threads(2)
    y = tconv.conv_transpose2d(x, w, stride=2, backend="blas")
    for _ in range(2):  # the second time, after the pool threads set their (ignored) count
        tconv.conv_transpose2d_backward(y, x, w, stride=2, backend="blas")
        tconv.conv_transpose2d_backward(y, x, w, stride=2, backend="openmp")
        blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
        assert blas and all(lib["num_threads"] == 1 for lib in blas), blas


def test_openmp_refuses_gemm_sizes_beyond_blas_ints(openmp):
    from tconv_openmp import _plan

    with pytest.raises(ValueError, match="32-bit"):
        _plan.check_blas_ints(3, 2**31)


def test_openmp_unavailable_without_openmp_or_without_its_build(openmp, monkeypatch):
    backend = openmp.OpenMPBackend()
    monkeypatch.setattr(openmp.backend._kernels(), "built_with_openmp", lambda: False)
    available, reason = backend.availability()
    assert not available and "without OpenMP" in reason

    def missing():
        raise ImportError("no module named tconv_openmp._kernels")

    monkeypatch.setattr(openmp.backend, "_kernels", missing)
    available, reason = backend.availability()
    assert not available and "_kernels" in reason


def test_openmp_is_a_tconv_backend_with_a_rank_above_blas(openmp):
    backend = openmp.OpenMPBackend()
    assert isinstance(backend, tconv.backend.Backend)
    assert backend.name == "openmp" and backend.default_priority > 10
    assert not isinstance(backend, NumpyBackend)


def test_openmp_source_imports_without_its_compiled_kernels():
    """Importing the package must never fail: a missing build is an availability reason."""
    code = textwrap.dedent("""
        import sys, types
        sys.modules["tconv_openmp._kernels"] = None   # as if the extension were absent
        import tconv_openmp
        print(tconv_openmp.OpenMPBackend().availability())
    """)
    line = _run(code, extra_path=[ROOT / "backends" / "openmp"])
    assert line.startswith("(False,") and "reinstall tconv-openmp" in line


@pytest.mark.parametrize("path", ["folded", "column_tiles", "channel_blocks"])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_openmp_non_overlapping_taps_agree_with_numpy(openmp, monkeypatch, restore_threads, path, padding,
                                                       ndim, assert_close):
    """Stride = kernel (U-Net's k2 s2): col2im writes bias + term, with no fill first."""
    from tconv_openmp import _plan

    for attr, value in _plan_path(path, ndim).items():
        monkeypatch.setattr(_plan, attr, value)
    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    tconv.set_num_threads(2)
    rng = np.random.default_rng(ndim)
    x = rng.standard_normal((N, C_IN) + (SIZE[ndim],) * ndim)
    w = rng.standard_normal((C_IN, C_OUT // G) + (2,) * ndim)
    b = rng.standard_normal(C_OUT)
    kwargs = dict(stride=2, padding=padding, output_padding=padding, groups=G)
    conv = getattr(tconv, f"conv_transpose{ndim}d")
    assert_close(conv(x, w, b, **kwargs, backend="openmp"), conv(x, w, b, **kwargs, backend="numpy"))
    assert_close(conv(x, w, None, **kwargs, backend="openmp"), conv(x, w, None, **kwargs, backend="numpy"))


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_openmp_wide_kernels_split_output_channels(openmp, monkeypatch, restore_threads, threads, groups,
                                                   with_bias, assert_close):
    """Kernels wider than the grid run the core's patches route with each thread on a
    range of output channels (5 per group: ranges of unequal size at 2 and 3 threads)."""
    from tconv._args import prepare

    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    tconv.set_num_threads(threads)
    rng = np.random.default_rng(threads + groups)
    x = rng.standard_normal((2, 2 * groups, 3, 2))
    w = rng.standard_normal((2 * groups, 5, 12, 9))
    b = rng.standard_normal(5 * groups) if with_bias else None
    kwargs = dict(stride=(6, 5), padding=(2, 1), groups=groups)
    dy = tconv.conv_transpose2d(x, w, b, **kwargs, backend="numpy")
    call = prepare(transposed=True, ndim=2, x=x, weight=w, bias=b, stride=kwargs["stride"],
                   padding=kwargs["padding"], groups=groups, grad_output=dy, backward=True, backend="openmp")
    described = call.backend.describe_plan("scatter", call.x, call.weight, call.bias, call.geom)
    assert described.startswith(f"output channels in {threads} ranges on the thread pool, each core: patches")
    assert_close(tconv.conv_transpose2d(x, w, b, **kwargs, backend="openmp"), dy)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("bad", [None, np.nan])
def test_openmp_shifted_route_splits_output_channels(openmp, monkeypatch, restore_threads, threads, bad):
    """Stride-1 layers on the core's shifted route run with each thread on a range of
    output channels, whole blocks of 8 (the unpacked kernel's rows) where there are
    enough: the 1-thread ``blas`` bits at any thread count. A NaN weight sends the
    whole call to the core's fallback (only the cells the definition reaches are NaN)."""
    from tconv import _blas_backend
    from tconv._args import prepare

    if not _blas_backend._blas_core.small_gemm_available():
        pytest.skip("the shifted route needs the core's AVX-512F kernel")
    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    rng = np.random.default_rng(threads)
    x = rng.standard_normal((2, 16, 20, 21)).astype(np.float32)
    w = rng.standard_normal((16, 40, 3, 3)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    if bad is not None:
        w[3, 17, 0, 0] = bad
    tconv.set_num_threads(1)
    expected = tconv.conv_transpose2d(x, w, b, padding=1, backend="blas")
    tconv.set_num_threads(threads)
    call = prepare(transposed=True, ndim=2, x=x, weight=w, bias=b, stride=1, padding=1, backend="openmp")
    described = call.backend.describe_plan("scatter", call.x, call.weight, call.bias, call.geom)
    assert described.startswith(f"output channels in {threads} ranges on the thread pool, each core: shifted")
    assert openmp.backend._channel_bounds(40, "shifted") == ([0, 24, 40] if threads == 2 else [0, 16, 32, 40])
    got = tconv.conv_transpose2d(x, w, b, padding=1, backend="openmp")
    np.testing.assert_array_equal(got, expected)
    if bad is not None:
        assert np.isnan(got[:, 17]).any() and not np.isnan(got[:, 17]).all()
        assert not np.isnan(np.delete(got, 17, axis=1)).any()


def test_openmp_streaming_1x1_convolutions_run_on_the_core(openmp, restore_threads):
    """A 1x1 convolution of few channels over a large image (the core's streaming
    kernel: reductions of at most 16, at most 64 output channels, 16384 cells or
    more) runs on the core at any thread count, with its bits; wider ones run
    this backend's tasks."""
    from tconv import _blas_backend
    from tconv._args import prepare

    if not _blas_backend._blas_core.small_gemm_available():
        pytest.skip("the streaming kernel needs AVX-512F")
    rng = np.random.default_rng(7)
    tconv.set_num_threads(2)
    for c_in, c_out, on_core in [(4, 8, True), (32, 64, False)]:
        x = rng.standard_normal((c_in, 130, 131)).astype(np.float32)
        w = rng.standard_normal((c_out, c_in, 1, 1)).astype(np.float32)
        b = rng.standard_normal(c_out).astype(np.float32)
        call = prepare(transposed=False, ndim=2, x=x, weight=w, bias=b, backend="openmp")
        described = call.backend.describe_plan("gather", call.x, call.weight, call.bias, call.geom)
        assert described.startswith("core, one thread: ") == on_core, described
        got = tconv.conv2d(x, w, b, backend="openmp")
        tconv.set_num_threads(1)
        expected = tconv.conv2d(x, w, b, backend="blas")
        tconv.set_num_threads(2)
        if on_core:
            np.testing.assert_array_equal(got, expected)
        np.testing.assert_allclose(got, np.einsum("oi,ihw->ohw", w[:, :, 0, 0], x) + b[:, None, None],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("route", ROUTE_SHAPES)
def test_openmp_describes_its_plans(openmp, monkeypatch, restore_threads, route):
    """``describe_plan`` (the benchmark's JSON) names where each primitive runs."""
    from tconv._args import prepare
    from tconv_openmp import _plan

    x_shape, w_shape, stride = ROUTE_SHAPES[route]
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    dy = tconv.conv_transpose2d(x, w, stride=stride, backend="numpy")
    call = prepare(transposed=True, ndim=2, x=x, weight=w, stride=stride, grad_output=dy, backward=True,
                   backend="openmp")
    backend, geom = call.backend, call.geom
    calls = {"scatter": (call.x, call.weight, None, geom),
             "gather_and_weight_grad": (call.grad_output, call.weight, call.x, geom),
             "weight_grad": (call.grad_output, call.x, geom)}
    tconv.set_num_threads(1)
    for primitive, args in calls.items():
        assert backend.describe_plan(primitive, *args).startswith("core, one thread: ")
    tconv.set_num_threads(2)
    monkeypatch.setattr(openmp.backend, "PARALLEL_MIN_MACS", 0)
    scatter = "output channels in 2 ranges on the thread pool, " if "patches" in route else "openmp col2im, "
    assert backend.describe_plan("scatter", *calls["scatter"]).startswith(scatter)
    assert backend.describe_plan("weight_grad", *calls["weight_grad"]).startswith("openmp im2col, ")
    pair = calls["gather_and_weight_grad"]
    assert backend.describe_plan("gather_and_weight_grad", *pair).startswith("side by side on two threads, each core: ")
    monkeypatch.setattr(openmp.backend, "SIDE_BY_SIDE_MAX_MACS", 0)
    assert backend.describe_plan("gather_and_weight_grad", *pair).startswith("two calls: ")
    if x_shape[0] > 1:
        monkeypatch.setattr(_plan, "PAIR_MIN_PART_MACS", 1)
        monkeypatch.setattr(_plan, "PAIR_MIN_PART_COLUMNS", 1)
        described = backend.describe_plan("gather_and_weight_grad", *calls["gather_and_weight_grad"])
        assert " batch parts on the thread pool, each core: " in described
