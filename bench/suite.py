"""Runs the suite: for each thread count, case, backend: check, then time.

The result is one JSON-ready document (see :func:`run_suite`); rendering it
is :mod:`bench.report`'s job, judging it against the targets
:mod:`bench.summary`'s.

Order within one case and thread count: the peers run first to give the
reference result; each tconv backend is checked against it (float32: error
at most ``RTOL`` of the output's scale); then tconv and the peers are timed
side by side, one sample of each per round, so that a change of load on a
shared machine hits them alike. A backend that fails the check is reported
and not timed.

Thread scaling is measured apart, after the cases (:func:`scaling_plan`):
the outer loop over thread counts puts a backend's 1-thread and 2-thread
timings of a case minutes apart, and on a shared machine the load changes in
between, so their ratio says more about the load than about the backend.
For the large cases (``layers.SCALING_CASES``) each backend is timed at the
lowest and the highest thread count side by side, on the same arrays, one
sample of each per round.
"""

from __future__ import annotations

import datetime
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import tconv

from . import layers, machine, peers, subject, summary
from .timing import MIB, measure_interleaved, measure_memory

__all__ = ["Options", "RTOL", "SCALING_MIN_ROUNDS", "choose_backends", "scaling_plan", "run_suite", "max_rel_error"]

#: float32 agreement with the reference, relative to the output's largest magnitude.
RTOL = 1e-4

#: Fewest rounds of the thread-scaling measurement, whatever ``repeat`` says:
#: its paired ratios are noisier than a median of times.
SCALING_MIN_ROUNDS = 7

#: A thread-scaling sample repeats its call for at least this long. Each
#: sample starts after the process went quiet, so the first parallel region
#: wakes a sleeping core: on a VM that costs up to ~10 ms, a third of a 30 ms
#: call if it were timed alone. Several calls back to back measure what a
#: layer called in a loop sees, with the wake-up spread over them.
SCALING_MIN_SAMPLE_S = 0.1

#: SPEC's first worked example: the seed case's exact output.
SEED_EXPECTED = np.array(
    [[1, 4, 7, 6], [5, 16, 22, 14], [9, 22, 16, 6], [9, 18, 11, 4]], dtype=np.float32
).reshape(1, 1, 4, 4)


@dataclass
class Options:
    """What ``python -m bench`` was asked for (see ``--help``)."""

    layers: list[str] | None = None
    backends: list[str] | None = None
    threads: list[int] = field(default_factory=lambda: [1, 2])
    repeat: int = 7
    quick: bool = False
    split: bool = False
    memory: bool = True
    gemm_size: int = 2048
    scaling: bool = True


def max_rel_error(got: Any, want: Any) -> float:
    """``max |got - want| / max |want|`` (the worst over a tuple of arrays)."""
    if isinstance(want, tuple):
        return max(max_rel_error(g, w) for g, w in zip(got, want))
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf
    if want.size == 0:
        return 0.0
    scale = float(np.max(np.abs(want)))
    diff = float(np.max(np.abs(got - want)))
    return diff / scale if scale > 0 else diff


def choose_backends(requested: list[str] | None) -> tuple[dict[str, str], list[str]]:
    """``{backend: scope}`` to run, scope ``"all"`` or ``"seed"``, and notes.

    Without a request: every available backend; the ``numpy`` reference
    only on the seed case (it is tens of times slower on real layers),
    unless it is the only backend there is.

    Raises
    ------
    ValueError
        When a requested backend is unknown or cannot run here.
    """
    infos = {info.name: info for info in tconv.list_backends()}
    available = [name for name, info in infos.items() if info.available]
    notes = [
        f"backend {name!r} not run: {info.reason}" for name, info in infos.items() if not info.available
    ]
    if requested:
        bad = [name for name in requested if name not in available]
        if bad:
            raise ValueError(
                f"--backends {' '.join(bad)}: not available here; available: {', '.join(available)}"
                + "".join(f"; {note}" for note in notes)
            )
        return {name: "all" for name in requested}, notes
    compiled = [name for name in available if name != "numpy"]
    if not compiled:
        notes.append("only the numpy reference backend is available: it runs every case")
        return {name: "all" for name in available}, notes
    chosen = {name: "all" for name in compiled}
    if "numpy" in available:
        chosen["numpy"] = "seed"
        notes.append("numpy reference backend run on the seed case only (name it in --backends for more)")
    return chosen, notes


def scaling_plan(options: Options, backends: dict[str, str]) -> list[tuple[str, layers.Case]]:
    """The ``(backend, case)`` pairs the thread-scaling measurement times, in order.

    Parameters
    ----------
    options : Options
        Nothing is planned with ``scaling`` off or fewer than two distinct
        ``threads``; the cases are those of ``layers.SCALING_CASES`` that
        ``layers`` and ``quick`` select.
    backends : dict of str -> str
        The run's backends (:func:`choose_backends`); the ``numpy`` reference
        is left out (it has no threads to scale).

    Returns
    -------
    list of (str, Case)
    """
    if not options.scaling or len(set(options.threads)) < 2:
        return []
    cases = [c for c in layers.select(options.layers, options.quick) if c.name in layers.SCALING_CASES]
    return [(name, case) for case in cases for name in backends if name != "numpy"]


def _arrays(case: layers.Case) -> dict[str, np.ndarray]:
    arrays = case.layer.arrays()
    if case.direction == "backward":
        arrays["grad_output"] = case.layer.grad_output()
    return arrays


def _speedups(tconv_s: float, peer_times: dict[str, float]) -> dict[str, Any]:
    result: dict[str, Any] = {name: t / tconv_s for name, t in peer_times.items()}
    if peer_times:
        best = min(peer_times, key=peer_times.get)
        result["best"] = peer_times[best] / tconv_s
        result["best_peer"] = best
    return result


def _peer_runs(case, arrays, threads, available_peers) -> tuple[dict, dict, Any, str | None]:
    """Each peer's record and runner, and the first peer's result (the reference)."""
    records, runners, reference, reference_name = {}, {}, None, None
    for peer in available_peers:
        try:
            run = peer.runner(case, arrays, threads)
            result = run()
        except peers.Unsupported as exc:
            records[peer.name] = {"skipped": str(exc)}
            continue
        except Exception as exc:
            records[peer.name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
            continue
        record = {}
        if reference is None:
            reference, reference_name = result, peer.name
        else:
            record["error_vs_reference"] = max_rel_error(result, reference)
        records[peer.name] = record
        runners[peer.name] = run
    return records, runners, reference, reference_name


def _checked_run(name, case, arrays, threads, reference, reference_name) -> tuple[dict, Callable | None]:
    """A backend's record (its check) and its runner, or None when it must not be timed."""
    record: dict[str, Any] = {}
    tconv.set_num_threads(threads)
    run = subject.runner(name, case, arrays)
    try:
        result = run()
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        return record, None
    record["blas_threads_after_call"] = subject.blas_threads()
    against = reference_name
    if reference is None and name != "numpy":
        # no peer installed: the numpy reference backend is the next best oracle
        reference, against = subject.runner("numpy", case, arrays)(), "numpy backend"
    check: dict[str, Any] = {"against": against, "rtol": RTOL}
    if reference is not None:
        check["rel_error"] = max_rel_error(result, reference)
        check["ok"] = check["rel_error"] <= RTOL
    if case.layer.name == layers.SEED and case.direction == "forward":
        check["worked_example_error"] = max_rel_error(result, SEED_EXPECTED)
        check["ok"] = check.get("ok", True) and check["worked_example_error"] <= RTOL
    record["check"] = check
    plan = subject.describe_plan(name, case, arrays)
    if plan is not None:
        record["plan"] = plan
    return record, (run if check.get("ok", True) else None)  # a wrong result is not timed


def run_suite(options: Options, step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and return its document.

    Parameters
    ----------
    options : Options
    step : callable, optional
        Called with a description before each unit of work (the progress bar).

    Returns
    -------
    dict
        ``machine`` (with ``gemm_peak`` per thread count), ``peers``,
        ``backends``, ``default_backend``, ``notes``, ``results`` (one per
        case and thread count), ``summary``, ``scaling`` (one per backend and
        case of :func:`scaling_plan`) and ``scaling_summary``.
    """
    step = step or (lambda description: None)
    cases = layers.select(options.layers, options.quick)
    backends, notes = choose_backends(options.backends)
    peer_list = peers.all_peers()
    available_peers = [p for p in peer_list if p.available]
    notes += [p.note for p in peer_list if not p.available]
    document: dict[str, Any] = {
        "schema": 1,
        "tconv_version": tconv.__version__,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "options": vars(options).copy(),
        "rtol": RTOL,
        "machine": machine.machine_info(),
        "peers": {p.name: p.info() for p in peer_list},
        "backends": {
            name: {"scope": scope, "description": tconv.registry.resolve_backend(name).description}
            for name, scope in backends.items()
        },
        "default_backend": tconv.get_backend(),
        "notes": notes,
        "results": [],
        "scaling": [],
    }
    document["machine"]["gemm_peak"] = {}
    # other work on the machine (the 1-minute figure first) skews multi-thread timings most
    document["machine"]["load_average"] = {"start": list(os.getloadavg())}
    saved_threads = tconv.get_num_threads()
    try:
        for threads in options.threads:
            step(f"GEMM peak, {threads} thread(s)")
            before = machine.gemm_peak(threads, options.gemm_size)
            block = []
            for case in cases:
                step(f"{case.name}, {threads} thread(s)")
                block.append(_run_case(case, threads, backends, available_peers, options))
            after = machine.gemm_peak(threads, options.gemm_size)
            # a busy moment only makes a GEMM slower: keep the faster measurement
            peak = max(before, after, key=lambda p: p["gflops"])
            peak = dict(peak, before=before["gflops"], after=after["gflops"])
            document["machine"]["gemm_peak"][str(threads)] = peak
            for record in block:
                _add_peak_fraction(record, peak)
            document["results"] += block
        low, high = min(options.threads), max(options.threads)
        rounds = max(options.repeat, SCALING_MIN_ROUNDS)
        arrays: dict[str, dict[str, np.ndarray]] = {}
        for name, case in scaling_plan(options, backends):
            step(f"scaling: {name} {case.name}, {low} vs {high} threads")
            if case.name not in arrays:
                arrays = {case.name: _arrays(case)}  # one case's arrays alive at a time
            document["scaling"].append(
                _run_scaling(name, case, arrays[case.name], (low, high), rounds, document["results"])
            )
    finally:
        tconv.set_num_threads(saved_threads)
    document["machine"]["load_average"]["end"] = list(os.getloadavg())
    document["summary"] = summary.summarize(document)
    document["scaling_summary"] = summary.summarize_scaling(document)
    document["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return document


def _add_peak_fraction(record: dict[str, Any], peak: dict[str, Any]) -> None:
    """Each backend's GFLOP/s over the GEMM peak: the one timed in the same rounds, if any."""
    same_rounds = record.get("gemm_peak_same_rounds")
    reference = same_rounds["gflops"] if same_rounds else peak["gflops"]
    for result in record["tconv"].values():
        if "gflops" in result:
            result["peak_fraction"] = result["gflops"] / reference


def _run_case(case, threads, backends, available_peers, options) -> dict[str, Any]:
    layer = case.layer
    arrays = _arrays(case)
    record: dict[str, Any] = {
        "case": case.name,
        "layer": layer.name,
        "network": layer.network,
        "direction": case.direction,
        "op": layer.op,
        "shape": layer.describe(),
        "input_shape": list(layer.input_shape),
        "weight_shape": list(layer.weight_shape),
        "output_shape": list(layer.output_shape),
        "flops": case.flops,
        "threads": threads,
        "inputs_mib": sum(a.nbytes for a in arrays.values() if a is not None) / MIB,
    }
    # 1. the peers' results are the reference; 2. each backend is checked against it
    peer_records, peer_runners, reference, reference_name = _peer_runs(case, arrays, threads, available_peers)
    record["reference"] = reference_name
    record["peers"] = peer_records
    record["tconv"], tconv_runners = {}, {}
    for name, scope in backends.items():
        if scope == "seed" and layer.name != layers.SEED:
            continue
        result, run = _checked_run(name, case, arrays, threads, reference, reference_name)
        record["tconv"][name] = result
        if run is not None:
            tconv_runners[name] = run
    del reference

    # 3. everything that passed is timed side by side, round after round
    tconv.set_num_threads(threads)
    runners = {("tconv", n): r for n, r in tconv_runners.items()}
    runners.update({("peer", n): r for n, r in peer_runners.items()})
    if options.split:
        runners[("gemm", "floor")] = subject.gemm_floor(case, threads)
    if case.name in layers.DCGAN_PEAK:
        # the peak these cases are held to is timed in the same rounds as they are
        runners[("gemm", "peak")], peak_flops = machine.gemm_runner(threads, options.gemm_size)
    timings = measure_interleaved(runners, options.repeat)
    if ("gemm", "peak") in timings:
        timing = timings.pop(("gemm", "peak"))
        record["gemm_peak_same_rounds"] = {"gflops": peak_flops / timing.median / 1e9, "timing": timing.as_dict()}
    if options.split:
        floor = timings.pop(("gemm", "floor"))
        record["gemm_floor"] = {"median_s": floor.median, "timing": floor.as_dict(),
                                "gemms": [list(shape) for shape in subject.gemm_shapes(case)]}
    for (kind, name), timing in timings.items():
        target = record["tconv"][name] if kind == "tconv" else peer_records[name]
        target["timing"] = timing.as_dict()
        target["median_s"] = timing.median
        target["gflops"] = case.flops / timing.median / 1e9
        if options.memory:
            # tracemalloc cannot see the peers' allocators: resident memory only for them.
            # The compiled backends keep their work buffers between calls: dropped before
            # each measure, so that the measured call allocates them and they count.
            release = tconv.registry.resolve_backend(name).release_workspace if kind == "tconv" else None
            target["memory"] = measure_memory(runners[kind, name], traced=kind == "tconv",
                                              release=release).as_dict()

    peer_times = {name: r["median_s"] for name, r in peer_records.items() if "median_s" in r}
    for result in record["tconv"].values():
        if "median_s" in result:
            result["speedup"] = _speedups(result["median_s"], peer_times)
    return record


def _run_scaling(name, case, arrays, threads, rounds, results) -> dict[str, Any]:
    """One backend's thread scaling on one case: both thread counts timed in the same rounds.

    Each call sets its thread count itself, so the two can alternate. A
    backend that was not timed in the suite at either count (it failed, or
    its result was wrong) is recorded as skipped.
    """
    low, high = threads
    record: dict[str, Any] = {
        "backend": name, "case": case.name, "shape": case.layer.describe(), "flops": case.flops,
        "threads": [low, high],
    }
    for r in results:
        if r["case"] == case.name and r["threads"] in threads and "median_s" not in r["tconv"].get(name, {}):
            record["skipped"] = f"not timed in the suite at {r['threads']} thread(s)"
            return record
    run = subject.runner(name, case, arrays)

    def at(n: int) -> Callable[[], Any]:
        def call():
            tconv.set_num_threads(n)
            return run()
        return call

    # rounds are kept whatever a call lasts: the paired ratios need them
    timings = measure_interleaved({low: at(low), high: at(high)}, rounds, slow_repeat=rounds,
                                  min_sample_s=SCALING_MIN_SAMPLE_S)
    slow, fast = timings[low], timings[high]
    ratios = [a / b for a, b in zip(slow.samples, fast.samples)]
    record.update(
        rounds=len(ratios),
        median_s=[slow.median, fast.median],
        speedup=slow.median / fast.median,
        paired_speedup=statistics.median(ratios),
        paired_ratios=ratios,
        timing=[slow.as_dict(), fast.as_dict()],
    )
    return record
