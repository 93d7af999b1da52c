"""How one call is measured: its time (median of repeats) and its extra memory.

Time
    Warm-up calls (the fastest of three sizes the samples), then ``repeat``
    samples, taken in rounds when several calls are compared;
    a sample runs the call ``number`` times back to back, with ``number``
    chosen so a sample lasts at least ``min_sample_s`` (a microsecond call
    is not timed one at a time: the clock's own cost would dominate). The
    garbage collector is off while timing, as in :mod:`timeit`.

Memory
    Two lower bounds of what a call allocates beyond its inputs and its
    output, each blind to something:

    * *traced*: :mod:`tracemalloc`'s peak. It sees NumPy's data buffers and
      Python's and ``PyMem_*`` allocations, not a raw C ``malloc`` (nor
      PyTorch's or ONNX Runtime's allocators).
    * *RSS*: the growth of the process's resident high-water mark
      (``VmHWM``, reset through ``/proc/self/clear_refs``) after returning
      free heap to the system with ``malloc_trim``. It sees every allocator,
      but not memory reused from pages already resident.
"""

from __future__ import annotations

import ctypes
import gc
import math
import resource
import statistics
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any, Callable


__all__ = ["Timing", "Memory", "measure_time", "measure_interleaved", "measure_memory", "result_bytes", "wait_until_quiet"]

MIB = 1024 * 1024


@dataclass
class Timing:
    """Per-call seconds of each sample, and how many calls a sample ran."""

    samples: list[float]
    number: int
    warmup_s: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": min(self.samples),
            "samples_s": self.samples,
            "calls_per_sample": self.number,
            "warmup_s": self.warmup_s,
        }


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_until_quiet(window_s: float = 0.01, busy_fraction: float = 0.1, max_s: float = 0.5) -> float:
    """Sleep until no thread of this process uses the CPU; return the seconds waited.

    Thread pools do not sleep as soon as their work is done: OpenBLAS's
    threads spin for about 0.1 s, ONNX Runtime's and OpenMP's for tens of
    milliseconds. Timing tconv right after PyTorch (or the reverse) would
    have the previous library's spinning threads compete for the cores.
    While this thread sleeps, any CPU time the process uses is theirs.
    """
    waited = 0.0
    while waited < max_s:
        before = _process_cpu_s()
        time.sleep(window_s)
        waited += window_s
        if _process_cpu_s() - before < busy_fraction * window_s:
            break
    return waited


def measure_time(fn: Callable[[], Any], repeat: int = 7, **kwargs) -> Timing:
    """Warm up once, then time ``repeat`` samples of ``fn()`` (see :func:`measure_interleaved`)."""
    return measure_interleaved({"call": fn}, repeat, **kwargs)["call"]


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeat: int = 7,
    *,
    min_sample_s: float = 0.05,
    slow_call_s: float = 1.0,
    slow_repeat: int = 3,
) -> dict[str, Timing]:
    """Time several calls in rounds: one sample of each per round.

    On a machine shared with other work the load changes from second to
    second; taking the samples of tconv and its peers side by side, round
    after round (the order rotating), lets a change hit them all alike, so
    their ratios stay fair. Before each sample the threads left spinning by
    the previous library are waited out (:func:`wait_until_quiet`): a user
    runs one library at a time, not three.

    Parameters
    ----------
    fns : dict of name -> callable
        The calls, arguments bound.
    repeat : int
        Samples per call (the median is reported).
    min_sample_s : float
        A sample lasts at least this long (``number`` calls per sample): back
        to back, as a layer called in a loop runs. Each sample starts after
        the process went quiet, so its first call wakes the library's thread
        pool (on this project's VM, up to ~10 ms for an idle vCPU); 50 ms of
        calls spread that over several of them, for every library alike.
    slow_call_s, slow_repeat : float, int
        When a call is slower than ``slow_call_s``, at most ``slow_repeat``
        rounds are run, so a slow reference does not stall the run.
    """
    names = list(fns)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        numbers, warmups, slowest = {}, {}, 0.0
        for name in names:
            fn = fns[name]
            wait_until_quiet()
            start = time.perf_counter()
            fn()
            warmups[name] = single = time.perf_counter() - start
            if single < slow_call_s:
                # A call is sized on the fastest of three runs: the first ones may pay
                # one-time costs, or a thread pool waking from sleep (on a virtual
                # machine an idle vCPU can take ~10 ms to wake), which would make a
                # 2 ms call look like a 12 ms one and leave it un-repeated in a sample.
                for _ in range(2):
                    start = time.perf_counter()
                    fn()
                    single = min(single, time.perf_counter() - start)
            single = max(single, 1e-9)
            numbers[name] = max(1, math.ceil(min_sample_s / single))
            slowest = max(slowest, single)
        if slowest > slow_call_s:
            repeat = min(repeat, slow_repeat)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(max(1, repeat)):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                fn, number = fns[name], numbers[name]
                if len(names) > 1:
                    wait_until_quiet()  # the previous call's thread pool, spinning, is not this one's cost
                start = time.perf_counter()
                for _ in range(number):
                    fn()
                samples[name].append((time.perf_counter() - start) / number)
    finally:
        if was_enabled:
            gc.enable()
    return {name: Timing(samples[name], numbers[name], warmups[name]) for name in names}


def result_bytes(result: Any) -> int:
    """Bytes of the arrays a call returned (an array, or a tuple of them)."""
    if result is None:
        return 0
    if isinstance(result, (tuple, list)):
        return sum(result_bytes(r) for r in result)
    return int(getattr(result, "nbytes", 0))


@dataclass
class Memory:
    """Extra bytes of one call (``None``: could not be measured here)."""

    traced: int | None = None
    rss: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def extra(self) -> int | None:
        """The larger of the two lower bounds."""
        known = [v for v in (self.traced, self.rss) if v is not None]
        return max(known) if known else None

    def as_dict(self) -> dict[str, Any]:
        def mib(v):
            return None if v is None else v / MIB

        return {
            "extra_mib": mib(self.extra),
            "traced_extra_mib": mib(self.traced),
            "rss_extra_mib": mib(self.rss),
            "notes": self.notes,
        }


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_extra(fn: Callable[[], Any]) -> tuple[int | None, str]:
    if _LIBC is None or _status_kib("VmHWM") is None:
        return None, "RSS: /proc/self/status or glibc not available"
    wait_until_quiet()
    gc.collect()
    _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
    except OSError as exc:
        return None, f"RSS: cannot reset the high-water mark ({exc})"
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    extra = (peak - before) * 1024 - result_bytes(result)
    del result
    return max(0, extra), ""


def _traced_extra(fn: Callable[[], Any]) -> int:
    gc.collect()
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
        extra = peak - baseline - result_bytes(result)
        del result
    finally:
        if started_here:
            tracemalloc.stop()
    return max(0, extra)


def measure_memory(fn: Callable[[], Any], *, traced: bool = True,
                   release: Callable[[], None] | None = None) -> Memory:
    """Extra memory of one call of ``fn`` beyond its (pre-allocated) inputs and its result.

    Parameters
    ----------
    fn : callable
        Run once for each measure; call it once before (warm caches, lazy
        imports, thread pools) so one-time costs are not counted.
    traced : bool
        Also measure with :mod:`tracemalloc` (meaningless for a peer whose
        allocator it cannot see).
    release : callable, optional
        Called before each measure: drops buffers ``fn`` keeps from call to
        call, so that the measured call allocates them and they are counted.
    """
    release = release or (lambda: None)
    memory = Memory()
    release()
    memory.rss, note = _rss_extra(fn)
    if note:
        memory.notes.append(note)
    if traced:
        release()
        memory.traced = _traced_extra(fn)
    return memory
