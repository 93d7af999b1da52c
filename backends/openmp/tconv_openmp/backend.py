"""The ``openmp`` backend: plans a call (``_plan``) and runs it on several cores (``_kernels``).

Threads: the budget is ``tconv.get_num_threads()`` (``set_num_threads``,
else ``TCONV_NUM_THREADS``, else the usable cores). All of it goes to
OpenMP; BLAS is set to one thread, since each OpenMP thread runs its own
GEMMs, so the two never oversubscribe the cores. With a budget of one
thread there is nothing to share out: calls run the core's ``blas``
kernels, which are tuned for one core.

Reproducibility: the plan depends on the shape and dtype only, so results
are bitwise identical from run to run and for any thread count from 2 up
(with the same BLAS library); at 1 thread they are the ``blas`` backend's.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tconv import _threads
from tconv._blas_backend import (BlasBackend, _blas_core, covers_exactly, empty_result, gather_streams,
                                 phased_acc_bytes, scatter_route)
from tconv._numpy_backend import NumpyBackend
from tconv.backend import Backend, Geometry, taps_leave_image, weight_grad_needs_exact
from tconv.registry import get_num_threads

from . import _plan

#: Where im2col's zero-filled taps would meet a NaN or Inf (``0 * NaN`` is
#: NaN), the tap-by-tap reference gives the definition's result: such calls
#: (non-finite weights or gradients with padding) go there.
_EXACT = NumpyBackend()

#: Below this many multiply-adds a call runs on the core's ``blas`` kernels,
#: on one thread: starting threads (and this backend's planning) would cost
#: more than the work. The choice depends on the shape alone, so results stay
#: independent of the thread count.
PARALLEL_MIN_MACS = 1 << 18

#: A backward pair too small for batch parts, of at most this many
#: multiply-adds per gradient, runs its two gradients side by side, one per
#: thread, on the core's kernels (each with its own im2col: the two GEMMs have
#: the same multiply-adds), instead of one parallel call after the other, each
#: of which gained little on two threads (DCGAN batch 1 128->64: the weight
#: gradient 0.82-0.93 ms at 2 threads against 0.99-1.03 for the core on one).
#: At 2 threads, interleaved A/B: DCGAN batch 1 128->64 (3.4e7 per gradient)
#: 1.51 -> 1.30 and 1.63 -> 1.60 ms (once 1.9 -> 2.5, when the helper woke late
#: and the caller ran both), steady loops 1.51-1.61 -> 1.35-1.41; DCGAN 100->512
#: (5.2e7; 64 columns, no batch parts) 3.8 -> 2.5 ms. Shape only, like every cut
#: here, so the bits do not depend on the thread count; larger single-sample
#: pairs keep every thread busy through the two calls.
SIDE_BY_SIDE_MAX_MACS = 1 << 26

#: ... and at exactly two threads, so does a pair whose weight has at least
#: this many bytes: each thread then runs one gradient's GEMMs over the whole
#: batch, where batch parts had each thread run both, each part summing its
#: own weight-gradient partial (8 MiB for DCGAN 512->256). At 2 threads,
#: interleaved A/B, medians of 9: DCGAN 512->256 backward 47.8 -> 44.1 ms,
#: 256->128 47.4 -> 45.3; lighter weights lose (128->64, 0.5 MiB: 49.8 ->
#: 54.5; 64->3: 6.3 -> 7.6). At three threads or more the parts stay (two
#: gradients would leave the other threads idle): these pairs' bits at 2
#: threads are then the core's, as at one thread, not those of 3 or more.
SIDE_BY_SIDE_MIN_WEIGHT_BYTES = 2 << 20

#: The core's shifted route on several threads gets ranges of output channels
#: that are whole multiples of this (the rows of the unpacked kernel's blocks).
SHIFTED_CHANNEL_UNIT = 8

#: The core's kernels, always with single-threaded BLAS: this backend never
#: threads BLAS. After a threaded call OpenBLAS's workers spin for about
#: 0.1 s waiting for more work, and this backend's OpenMP threads then share
#: the cores with them: the next parallel call ran 60-80% slower (DCGAN
#: 512->256 at 2 threads: 22 -> 36-40 ms after a BLAS-threaded layer).
_CORE = BlasBackend(blas_threads=1)


@functools.lru_cache(maxsize=1)
def _kernels():
    """The compiled module, or ImportError (kept lazy so importing this module never
    fails), its GEMMs pointed at the core's (its BLAS, ``tconv._blas_library``, and
    for float32 its choice of that or its AVX-512 kernel)."""
    from . import _kernels as kernels

    if _blas_core is not None:
        kernels.use_blas(*_blas_core.blas_addresses(), _blas_core.sgemm_rows_address())
    return kernels


def _side_by_side(parts: int, macs: int, weight_bytes: int) -> bool:
    """Whether a backward pair runs its two gradients side by side (see the constants)."""
    return ((parts == 1 and macs <= SIDE_BY_SIDE_MAX_MACS)
            or (weight_bytes >= SIDE_BY_SIDE_MIN_WEIGHT_BYTES and get_num_threads() == 2))


@functools.lru_cache(maxsize=128)
def _tables(geom: Geometry) -> tuple:
    """Index tables of ``geom`` in the order ``_kernels.make_tables`` reads them.

    Cached: a network calls the same few geometries over and over; the
    arrays are only ever read.
    """
    dims = list(zip(geom.image, geom.grid, geom.kernel, geom.stride, geom.dilation, geom.pad_begin))
    maps = tuple(_plan.image_index_map(*d) for d in dims)
    tables = (*maps, *_plan.image_entries(*dims[0]), *_plan.image_entries(*dims[1]),
              *_plan.tap_runs(*dims[2]))
    for table in tables:
        table.setflags(write=False)
    return tables


def _phased_acc(geom: Geometry) -> int:
    """The phased col2im accumulator's elements (the core's formula), 0 where the
    taps write the image exactly once (``covers_exactly``: nothing to accumulate)."""
    return 0 if covers_exactly(geom) else phased_acc_bytes(geom, 1)


# Work buffers are cached per calling thread and reused (see the core's
# ``_blas_core`` for why: freed multi-MiB blocks go back to the system, and
# faulting them in again on every call cost as much as a small layer's work).
_thread_cache = threading.local()


def _scratch(slot: str, count: int, dtype: np.dtype) -> np.ndarray:
    """``count`` elements of ``dtype`` from the calling thread's cached buffer ``slot``."""
    buffers = _thread_cache.__dict__.setdefault("buffers", {})
    nbytes = max(1, count) * dtype.itemsize
    buffer = buffers.get(slot)
    if buffer is None or buffer.nbytes < nbytes:
        buffers.pop(slot, None)  # free the old one before allocating the new one
        buffer = buffers[slot] = np.empty(nbytes, dtype=np.uint8)
    return buffer[:nbytes].view(dtype)


# The helper threads that run a backward pair's batch parts beside the calling
# thread (``gather_and_weight_grad``): one pool per helper count seen, kept (never
# shut down under a call that is submitting to it when another thread changes
# the budget).
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        executor = _pools.get(threads)
        if executor is None:
            executor = _pools[threads] = ThreadPoolExecutor(
                threads, thread_name_prefix="tconv-openmp", initializer=_helpers_off_caller_cpu.started)
        return executor


def _sched_getcpu():
    """glibc's ``sched_getcpu`` (the CPU the calling thread runs on), or None."""
    try:
        function = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    function.restype, function.argtypes = ctypes.c_int, []
    return function


class _OffCallerCpu:
    """Keeps the pool's helper threads off the CPU the calling thread runs on (Linux).

    The caller runs parts too, so a helper on its CPU only takes turns with it.
    The scheduler put the woken helper there once the process had made a
    2-thread OpenBLAS call (``blas`` at 2 threads, or NumPy's matmul): the
    autoencoder's backward at 2 threads then took 2.0-2.5 instead of 1.7-1.9 ms,
    for seconds. Only the caller's CPU is taken out of the helpers' affinity,
    re-read when the caller moves: other processes' helpers are not crowded
    onto one core.
    """

    def __init__(self) -> None:
        self._getcpu = _sched_getcpu() if hasattr(os, "sched_setaffinity") else None
        self._lock = threading.Lock()
        self._helpers: list[int] = []  # native thread ids
        self._caller_cpu = -1
        self._mask: set[int] | None = None
        self._allowed: set[int] | None = None  # the process's CPUs, read on the first update

    def started(self) -> None:
        """Pool thread initializer: register, and take the current mask."""
        if self._getcpu is None:
            return
        tid = threading.get_native_id()
        with self._lock:
            self._helpers.append(tid)
            mask = self._mask
        if mask:
            self._set(tid, mask)

    def update(self) -> None:
        """Before parts are handed out: exclude the calling thread's CPU now."""
        if self._getcpu is None:
            return
        cpu = self._getcpu()
        with self._lock:
            if self._allowed is None:  # (helpers inherit the affinity of the thread that starts them)
                self._allowed = os.sched_getaffinity(0)
            if cpu < 0 or cpu == self._caller_cpu:
                return
            mask = self._allowed - {cpu}
            if not mask:
                return
            self._caller_cpu, self._mask = cpu, mask
            helpers = list(self._helpers)
        for tid in helpers:
            self._set(tid, mask)

    @staticmethod
    def _set(tid: int, mask: set[int]) -> None:
        try:
            os.sched_setaffinity(tid, mask)
        except OSError:  # the thread ended, or the mask left the process's cpuset
            pass


_helpers_off_caller_cpu = _OffCallerCpu()


def _share_out(parts: int, run_part) -> None:
    """``run_part(i)`` for ``i`` in ``range(parts)``, by the calling thread and the pool's
    helpers taking parts in turn (up to the thread budget), each with single-threaded BLAS."""
    parts_left = iter(range(parts))  # shared: next() on it is atomic under the GIL

    def run_parts() -> None:
        for i in parts_left:
            run_part(i)

    # BLAS at one thread for the parts' GEMMs, set here: OpenBLAS ignores a count
    # set from another thread than the main one, so the pool threads cannot
    _threads.set_blas_threads(1)
    helpers = min(get_num_threads(), parts) - 1
    # the calling thread takes parts too: no wake-up to wait for at either end
    # (the pool's wake-ups had cost 0.1-0.3 ms of the autoencoder's ~2 ms)
    executor = _pool(helpers)
    _helpers_off_caller_cpu.update()
    futures = [executor.submit(run_parts) for _ in range(helpers)]
    try:
        run_parts()
    finally:  # the helpers write into the caller's arrays: wait for them even after an error
        for future in futures:
            future.result()


def _release_pool_workspace() -> None:
    """Drop the core's cached work buffers in every pool thread (one task per thread,
    each held at a barrier until all are running, so that no thread takes two)."""
    with _pools_lock:
        pools = dict(_pools)
    for size, executor in pools.items():
        barrier = threading.Barrier(size)

        def release(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            _CORE.release_workspace()

        for future in [executor.submit(release) for _ in range(size)]:
            future.result()


def _by_channels(route: str, q: int) -> bool:
    """Whether a transposed convolution on the core's ``route`` runs as ranges of its
    ``q`` output channels (``_core_by_channels``)."""
    return route == "shifted" or (route == "patches" and q > 1)


def _channel_bounds(q: int, route: str) -> list[int]:
    """Where ``q`` output channels are cut into one range per thread (the core's
    patches or shifted route): ``[0, ..., q]``, shifted ranges in whole units."""
    unit = SHIFTED_CHANNEL_UNIT if route == "shifted" and q >= 2 * SHIFTED_CHANNEL_UNIT else 1
    parts = max(1, min(get_num_threads(), q // unit))
    return [min(q, -(-q * i // parts // unit) * unit) for i in range(parts + 1)]


def _flat(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1)


def _bias(bias, dtype):
    if bias is None:
        return np.zeros(1, dtype=dtype), False
    return np.ascontiguousarray(bias, dtype=dtype), True


class OpenMPBackend(Backend):
    """Multicore CPU backend: each thread runs its own tasks with single-threaded BLAS."""

    name = "openmp"
    description = "Cython prange kernels, one single-threaded GEMM per task, for several cores"
    default_priority = 20

    def release_workspace(self) -> None:
        _thread_cache.__dict__.pop("buffers", None)
        _CORE.release_workspace()
        _release_pool_workspace()

    def availability(self) -> tuple[bool, str]:
        try:
            kernels = _kernels()
        except ImportError as exc:
            return False, f"compiled kernels not importable ({exc}); reinstall tconv-openmp"
        if not kernels.built_with_openmp():
            return False, ("built without OpenMP (the compiler took no OpenMP flag, or TCONV_OPENMP=0 "
                           "was set at build time); "
                           "reinstall tconv-openmp with an OpenMP-capable compiler")
        return True, ""

    def describe_plan(self, primitive: str, *args) -> str:
        """How ``primitive`` would run on these arguments (for the benchmark's JSON):
        on the core (and its plan) or as this backend's tasks."""
        geom = args[-1]
        first, second = args[0], args[1]
        n, c = first.shape[:2]
        g, itemsize = geom.groups, first.itemsize
        taps, cells = math.prod(geom.kernel), math.prod(geom.grid)
        if primitive == "weight_grad":  # (image_in, grid_in, geom)
            macs = n * c * second.shape[1] // g * taps * cells
        else:  # a weight second: n * weight.size * cells multiply-adds
            macs = n * second.size * cells
        if self._on_core(macs) or (primitive == "gather" and gather_streams(
                geom, n, c // g, second.shape[0] // g, itemsize)):
            return f"core, one thread: {_CORE.describe_plan(primitive, *args)}"
        if primitive == "gather_and_weight_grad":
            parts = _plan.pair_parts(n, macs, second.nbytes, n * cells)
            if _side_by_side(parts, macs, second.nbytes):
                return (f"side by side on two threads, each core: {_CORE.describe_plan('gather', first, second, None, geom)}"
                        f" | {_CORE.describe_plan('weight_grad', first, args[2], geom)}")
            if parts == 1:
                return (f"two calls: {self.describe_plan('gather', first, second, None, geom)}; "
                        f"{self.describe_plan('weight_grad', first, args[2], geom)}")
            part = (first[: n // parts], second, args[2][: n // parts], geom)
            return f"{parts} batch parts on the thread pool, each core: {_CORE.describe_plan(primitive, *part)}"
        route = scatter_route(geom, c // g, second.shape[1], itemsize) if primitive == "scatter" else None
        if _by_channels(route, second.shape[1]):
            parts = len(_channel_bounds(second.shape[1], route)) - 1
            return f"output channels in {parts} ranges on the thread pool, each core: {_CORE.describe_plan(primitive, *args)}"
        if primitive == "scatter":
            p, q = c // g, second.shape[1]
            plan = _plan.scatter_plan(n, g, p, q, taps, cells, math.prod(geom.image), itemsize,
                                      _phased_acc(geom), geom.stride[2], covers_exactly(geom))
            how = (f"direct tasks of {plan.block} output channels" if plan.direct
                   else "two phases: GEMMs into a shared buffer, then col2im by output lines")
            sample_minor = ", sample-minor" if plan.interleaved else ", phase-major channels" if plan.phased else ""
            return f"openmp col2im, {how}, {plan.tiling.describe()}{sample_minor}"
        p, q = c // g, (second.shape[0] if primitive == "gather" else second.shape[1]) // g
        if primitive == "gather":
            plan = _plan.gather_plan(n, g, p * taps, q, cells, p * math.prod(geom.image), itemsize)
        else:
            plan = _plan.weight_grad_plan(n, g, p * taps, q, cells, taps, math.prod(geom.image), itemsize)
        sample_minor = ", sample-minor" if plan.interleaved else ""
        return f"openmp im2col, row blocks of {plan.rows}, {plan.tiling.describe()}{sample_minor}"

    @staticmethod
    def _on_core(macs: int) -> bool:
        """Whether a call of ``macs`` multiply-adds runs on the core's kernels: when
        small, or when the budget is one thread (nothing to share out)."""
        return macs < PARALLEL_MIN_MACS or get_num_threads() == 1

    @staticmethod
    def _threads(tasks: int) -> int:
        """OpenMP threads for one call; BLAS is set to one thread per OpenMP thread, and
        the core told so in the calling thread, which runs tasks too: every task's
        float32 GEMM then takes the same path (the core's kernel or its BLAS) whichever
        thread runs it, as the bits must not depend on that."""
        _threads.set_blas_threads(1)
        if _blas_core is not None:
            _blas_core.set_gemm_threads(1)
        return max(1, min(get_num_threads(), tasks))

    def scatter(self, grid_in, weight, bias, geom):
        n, c_in = grid_in.shape[:2]
        cells = math.prod(geom.grid)
        # (weight.size * cells * n: the multiply-adds, checked first: small calls are the hot path)
        if self._on_core(n * weight.size * cells):
            return _CORE.scatter(grid_in, weight, bias, geom)
        g = geom.groups
        p, q = c_in // g, weight.shape[1]
        dtype = grid_in.dtype
        route = scatter_route(geom, p, q, dtype.itemsize)
        if _by_channels(route, q):
            return self._core_by_channels(grid_in, weight, bias, geom, route)
        taps = math.prod(geom.kernel)
        kernels = _kernels()
        plan = _plan.scatter_plan(n, g, p, q, taps, cells, math.prod(geom.image), dtype.itemsize,
                                  _phased_acc(geom), geom.stride[2], covers_exactly(geom))
        tiling = plan.tiling
        out = empty_result((n, g * q, *geom.image), dtype)
        bias_array, has_bias = _bias(bias, dtype)
        if plan.direct:
            _plan.check_blas_ints(cells, q * taps, p, tiling.width(cells))
            units = g * (-(-n // tiling.fold) if tiling.fold > 1 else n)
            threads = self._threads(units * -(-q // plan.block))
            work = _scratch("work", threads * plan.per_thread, dtype)
            kernels.scatter_direct(
                _flat(grid_in), _flat(weight), bias_array, has_bias, _flat(out), work,
                geom.image, geom.grid, geom.kernel, geom.stride[2], n, g, p, q, _tables(geom),
                plan.block, tiling.fold, tiling.tile, plan.per_thread, plan.interleaved,
                covers_exactly(geom) and not plan.interleaved, plan.phased, threads,
            )
            return out
        _plan.check_blas_ints(cells, q * taps, p, plan.samples * plan.cells)
        threads = self._threads(g * tiling.tiles(plan.samples, plan.cells))
        cols = _scratch("cols", plan.shared, dtype)
        work = _scratch("work", threads * plan.per_thread, dtype)
        kernels.scatter(
            _flat(grid_in), _flat(weight), bias_array, has_bias, _flat(out), cols, work,
            geom.image, geom.grid, geom.kernel, geom.stride[2], n, g, p, q, _tables(geom),
            plan.samples, plan.channels, plan.cells, tiling.fold, tiling.tile, plan.per_thread,
            threads,
        )
        return out

    def _core_by_channels(self, grid_in, weight, bias, geom, route: str):
        """The core's patches route (kernels wider than the grid: kernel rows added as
        runs) or shifted route (stride 1: each tap's product added into the output),
        its output channels cut into one range per thread. Shifted ranges are whole
        blocks of the unpacked kernel's rows where they can be (``SHIFTED_CHANNEL_UNIT``);
        each output element is computed alike whatever the ranges."""
        bounds = _channel_bounds(weight.shape[1], route)
        parts = len(bounds) - 1
        out = empty_result((grid_in.shape[0], geom.groups * weight.shape[1], *geom.image), grid_in.dtype)
        computed = [True] * parts

        def run_part(i: int) -> None:
            computed[i] = _CORE.scatter_channels_into(grid_in, weight, bias, geom, out, bounds[i], bounds[i + 1])

        _share_out(parts, run_part)
        if not all(computed):  # a non-finite weight: the shifted route computed nothing
            return _CORE.scatter(grid_in, weight, bias, geom)
        return out

    def gather(self, image_in, weight, bias, geom):
        n, c_in = image_in.shape[:2]
        cells = math.prod(geom.grid)
        if self._on_core(n * weight.size * cells):  # the multiply-adds
            return _CORE.gather(image_in, weight, bias, geom)
        g = geom.groups
        p, q = c_in // g, weight.shape[0] // g
        if gather_streams(geom, n, p, q, image_in.itemsize):
            # A 1x1 convolution of few channels over a large image only streams memory:
            # the core's unpacked kernel on one thread beats this backend's tasks on
            # two (their thin BLAS GEMMs pack every tile). At 2 threads, interleaved
            # medians of 7-9: 4->8 on 816x1022 (the benchmark's image convolution)
            # 4.0-9.1 -> 0.94-1.16 ms, 8->16 512x512 2.4 -> 1.7, 3->16 224x224 batch 8
            # 2.8 -> 1.5; 16->32 256x256 even; wider ones (32->64) run the tasks.
            return _CORE.gather(image_in, weight, bias, geom)
        taps = math.prod(geom.kernel)
        kernels = _kernels()
        if taps_leave_image(geom) and not kernels.all_finite(_flat(weight), get_num_threads()):
            return _EXACT.gather(image_in, weight, bias, geom)
        dtype = image_in.dtype
        plan = _plan.gather_plan(n, g, p * taps, q, cells, p * math.prod(geom.image), dtype.itemsize)
        tiling = plan.tiling
        _plan.check_blas_ints(cells, p * taps, q, tiling.width(cells))
        tasks = g * tiling.tiles(n, cells)
        threads = self._threads(tasks)
        out = empty_result((n, g * q, *geom.grid), dtype)
        work = _scratch("work", threads * plan.per_thread, dtype)
        bias_array, has_bias = _bias(bias, dtype)
        kernels.gather(
            _flat(image_in), _flat(weight), bias_array, has_bias, _flat(out), work,
            geom.image, geom.grid, geom.kernel, n, g, p, q, _tables(geom),
            tiling.fold, tiling.tile, plan.rows, plan.per_thread, plan.interleaved, threads,
        )
        return out

    def gather_and_weight_grad(self, image_in, weight, grid_in, geom):
        """Both gradients of a transposed convolution.

        Large pairs are cut into batch parts (``_plan.pair_parts``, by shape
        only), each run by the core's kernels on one thread, which share one
        im2col between the two GEMMs: the calling thread and a pool of helper
        threads take the parts in turn, their input gradients land in disjoint
        slices and their weight gradients are summed in part order. Small
        pairs run as two calls.
        """
        n = image_in.shape[0]
        macs = n * weight.size * math.prod(geom.grid)
        if self._on_core(macs):
            return _CORE.gather_and_weight_grad(image_in, weight, grid_in, geom)
        parts = _plan.pair_parts(n, macs, weight.nbytes, n * math.prod(geom.grid))
        if _side_by_side(parts, macs, weight.nbytes):
            return self._gradients_side_by_side(image_in, weight, grid_in, geom)
        if parts == 1:
            return super().gather_and_weight_grad(image_in, weight, grid_in, geom)
        bounds = [n * i // parts for i in range(parts + 1)]
        grad_image = empty_result((n, grid_in.shape[1], *geom.grid), image_in.dtype)
        grad_weight = np.empty((parts, *weight.shape), dtype=image_in.dtype)

        def run_part(i: int) -> None:
            rows = slice(bounds[i], bounds[i + 1])
            _CORE.gather_and_weight_grad_into(image_in[rows], weight, grid_in[rows], geom,
                                              grad_image[rows], grad_weight[i])

        _share_out(parts, run_part)
        total = grad_weight[0]
        for i in range(1, parts):  # in part order, whichever thread ran which part
            total += grad_weight[i]
        return grad_image, total

    @staticmethod
    def _gradients_side_by_side(image_in, weight, grid_in, geom):
        """A pair too small for batch parts (up to ``SIDE_BY_SIDE_MAX_MACS``), or with a heavy
        weight at two threads (``SIDE_BY_SIDE_MIN_WEIGHT_BYTES``), on two threads:
        the core's ``gather`` (input gradient) on one and its ``weight_grad`` on the other,
        each with its own im2col: the same bits as the core's pair, so as at one thread."""
        results = [None, None]

        def run_part(i: int) -> None:
            if i == 0:
                results[0] = _CORE.gather(image_in, weight, None, geom)
            else:
                results[1] = _CORE.weight_grad(image_in, grid_in, geom)

        _share_out(2, run_part)
        return results[0], results[1]

    def weight_grad(self, image_in, grid_in, geom):
        n, c_img = image_in.shape[:2]
        g = geom.groups
        p, q = c_img // g, grid_in.shape[1] // g
        taps, cells = math.prod(geom.kernel), math.prod(geom.grid)
        if self._on_core(n * g * p * q * taps * cells):
            return _CORE.weight_grad(image_in, grid_in, geom)
        kernels = _kernels()
        dtype = image_in.dtype
        plan = _plan.weight_grad_plan(n, g, p * taps, q, cells, taps, math.prod(geom.image), dtype.itemsize)
        tiling = plan.tiling
        _plan.check_blas_ints(cells, p * taps, q, tiling.width(cells))
        tasks = g * -(-(p * taps) // plan.rows)
        threads = self._threads(tasks)
        out = empty_result((g * q, p, *geom.kernel), dtype)
        work = _scratch("work", threads * plan.per_thread, dtype)
        kernels.weight_grad(
            _flat(image_in), _flat(grid_in), _flat(out), work,
            geom.image, geom.grid, geom.kernel, n, g, p, q, _tables(geom),
            plan.rows, tiling.fold, tiling.tile, plan.per_thread, plan.interleaved, threads,
        )
        if weight_grad_needs_exact(out, geom):  # 0 * NaN: see taps_leave_image
            return _EXACT.weight_grad(image_in, grid_in, geom)
        return out
