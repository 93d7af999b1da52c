"""Showing a benchmark document: terminal tables and progress (rich), JSON, PNG chart.

Everything here reads the document :func:`bench.suite.run_suite` returns;
nothing is measured.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any, Callable, Iterator

from rich.markup import escape
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .layers import SCALING_CASES
from .summary import TARGETS

__all__ = ["console", "progress", "print_report", "scaling_lines", "write_json", "write_plot"]

PEER_LABELS = {"torch": "torch", "ort": "ORT"}


def console(file=None) -> Console:
    """A console; wide when the output is not a terminal, so tables are not squeezed."""
    file = file or sys.stdout
    if file.isatty():
        return Console(file=file)
    return Console(file=file, width=180)


@contextlib.contextmanager
def progress(total: int, *, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A progress bar on stderr; yields ``step(description)``, called before each unit."""
    if not enabled:
        yield lambda description: None
        return
    bar = Progress(
        TextColumn("[bold]bench[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=Console(file=sys.stderr),
        transient=True,
    )
    with bar:
        task = bar.add_task("starting", total=total)
        started = False

        def step(description: str) -> None:
            nonlocal started
            if started:
                bar.advance(task)
            started = True
            bar.update(task, description=description)

        yield step
        bar.update(task, completed=total)


# --------------------------------------------------------------------------- #
# formatting
# --------------------------------------------------------------------------- #
def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_speedup(value: float | None, target: float | None = None) -> str:
    if value is None:
        return "-"
    colour = "green" if value >= 1.0 else ("yellow" if value >= TARGETS["min_speedup"] else "red")
    return f"[{colour}]{value:.2f}x[/]"


def fmt_fraction(value: float | None, target: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.0f}%"
    if target is not None:
        text = f"[{'green' if value >= target else 'red'}]{text}[/]"
    return text


def fmt_mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def fmt_meets(value: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[red]no[/]", None: "n/a"}[value]


# --------------------------------------------------------------------------- #
# terminal
# --------------------------------------------------------------------------- #
def _case_table(document: dict[str, Any], threads: int) -> Table:
    peak = document["machine"]["gemm_peak"][str(threads)]
    peer_names = list(document["peers"])
    title = (
        f"{threads} thread{'s' if threads > 1 else ''} - "
        f"GEMM peak {peak['gflops']:.0f} GFLOP/s (sgemm {peak['size']}^3, median; "
        f"{peak.get('before', peak['gflops']):.0f} before the cases, {peak.get('after', peak['gflops']):.0f} after; "
        f"the DCGAN b64 cases use one timed beside them)"
    )
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("case", no_wrap=True)
    table.add_column("shape", style="dim", no_wrap=True)
    table.add_column("backend")
    table.add_column("time", justify="right")
    table.add_column("GFLOP/s", justify="right")
    table.add_column("% peak", justify="right")
    for name in peer_names:
        table.add_column(f"{PEER_LABELS.get(name, name)}", justify="right")
    for name in peer_names:
        table.add_column(f"x{PEER_LABELS.get(name, name)}", justify="right")
    table.add_column("x best", justify="right")
    table.add_column("extra MiB", justify="right")
    table.add_column("GEMM share", justify="right")
    table.add_column("rel err", justify="right")
    split = any("gemm_floor" in r for r in document["results"])
    if not split:
        table.columns = [c for c in table.columns if c.header != "GEMM share"]
    for record in (r for r in document["results"] if r["threads"] == threads):
        peer_cells = []
        for name in peer_names:
            peer = record["peers"].get(name, {})
            peer_cells.append(fmt_time(peer.get("median_s")) if "median_s" in peer else "[dim]skip[/]")
        if not record["tconv"]:
            table.add_row(record["case"], record["shape"], "-", *["-"] * 3, *peer_cells)
            continue
        for backend, result in record["tconv"].items():
            check = result.get("check", {})
            if "median_s" not in result:
                why = result.get("error") or f"[red]wrong result: rel err {check.get('rel_error', math.nan):.1e}[/]"
                table.add_row(record["case"], record["shape"], backend, why, "", "", *peer_cells)
                continue
            speedup = result.get("speedup", {})
            cells = [
                record["case"],
                record["shape"],
                backend,
                fmt_time(result["median_s"]),
                f"{result['gflops']:.1f}",
                fmt_fraction(result["peak_fraction"]),
                *peer_cells,
                *[fmt_speedup(speedup.get(name)) for name in peer_names],
                fmt_speedup(speedup.get("best")),
                fmt_mib(result.get("memory", {}).get("extra_mib")),
            ]
            if split:
                floor = record.get("gemm_floor", {}).get("median_s")
                cells.append(fmt_fraction(None if floor is None else floor / result["median_s"]))
            error = check.get("rel_error")
            cells.append("-" if error is None else f"{error:.0e}")
            table.add_row(*cells)
    return table


_TARGET_LABELS = {
    "geomean_speedup": "geomean",
    "min_speedup": "min",
    "dcgan_peak_fraction": "DCGAN peak",
    "seed_time_over_torch": "seed",
    "extra_mib": "memory",
}


def _summary_table(document: dict[str, Any]) -> Table:
    options = document.get("options", {})
    subset = ("\n(a subset of the cases: the targets are set over the full suite, `python -m bench`; "
              "the quick subset is mostly the layers closest to the peers)"
              if options.get("quick") or options.get("layers") else "")
    table = Table(
        title=(
            "Summary - targets (bind the default backend): geomean x best >= 1, min >= 0.8, "
            "DCGAN b64 >= 70% of GEMM peak, seed <= 2x torch, extra <= 64 MiB" + subset
        ),
        title_justify="left",
        header_style="bold",
    )
    for header, justify in (
        ("backend", "left"), ("thr", "right"), ("geomean x best (fwd, bwd)", "right"),
        ("min x best", "left"), ("DCGAN b64 % peak", "right"), ("seed: tconv / torch", "right"),
        ("max extra MiB", "left"), ("missed", "left"),
    ):
        table.add_column(header, justify=justify, no_wrap=header.startswith(("seed", "geomean")))
    for s in document["summary"]:
        dcgan = " ".join(fmt_fraction(v, TARGETS["dcgan_peak_fraction"]) for v in s["dcgan_peak_fraction"].values())
        seed = "-"
        if "seed_time_over_torch" in s:
            seed = f"{s['seed_time_over_torch']:.2f}x ({s['seed_us']:.1f} / {s['seed_torch_us']:.1f} µs)"
        elif "seed_us" in s:
            seed = f"{s['seed_us']:.1f} µs"
        minimum = "-"
        if "min_speedup" in s:
            minimum = f"{fmt_speedup(s['min_speedup'])} {s['min_speedup_case']}"
        missed = [_TARGET_LABELS[k] for k, v in s["meets"].items() if v is False]
        verdict = "[red]" + ", ".join(missed) + "[/]" if missed else "[green]none[/]"
        table.add_row(
            s["backend"] + (" (default)" if s.get("default") else ""),
            str(s["threads"]),
            f"{fmt_speedup(s['geomean_speedup'])} ({fmt_speedup(s['geomean_speedup_forward'])}, "
            f"{fmt_speedup(s['geomean_speedup_backward'])})",
            minimum,
            dcgan or "-",
            seed,
            "-" if "max_extra_mib" not in s else f"{s['max_extra_mib']:.1f} {s['max_extra_mib_case']}",
            verdict,
        )
    return table


def _threads_label(n: int) -> str:
    return f"{n} thread{'s' if n > 1 else ''}"


def _scaling_table(document: dict[str, Any]) -> Table:
    low, high = document["scaling"][0]["threads"]
    table = Table(
        title=f"Thread scaling ({low} -> {high} threads, timed side by side)",
        title_justify="left",
        header_style="bold",
    )
    table.add_column("backend")
    table.add_column("case", no_wrap=True)
    table.add_column(f"{_threads_label(low)}", justify="right")
    table.add_column(f"{_threads_label(high)}", justify="right")
    table.add_column("speedup", justify="right")
    order = list(dict.fromkeys(r["backend"] for r in document["scaling"]))
    for r in sorted(document["scaling"], key=lambda r: order.index(r["backend"])):  # by backend, cases in order
        if "speedup" not in r:
            table.add_row(r["backend"], r["case"], f"[dim]{escape(r['skipped'])}[/]", "", "")
            continue
        table.add_row(r["backend"], r["case"], fmt_time(r["median_s"][0]), fmt_time(r["median_s"][1]),
                      f"{r['speedup']:.2f}x")
    return table


def scaling_lines(document: dict[str, Any]) -> list[str]:
    """One line per backend: its min and geomean thread-scaling speedup, and the target if it has one.

    Parameters
    ----------
    document : dict
        A benchmark document (``scaling_summary`` is read).

    Returns
    -------
    list of str
        Rich markup, e.g. ``openmp: 2-thread speedup on the large shapes min
        1.85x, geomean 1.90x (target >= 1.7x)``.
    """
    lines = []
    for s in document.get("scaling_summary", []):
        text = (
            f"{s['backend']}: {s['threads'][1]}-thread speedup on the large shapes "
            f"min {s['min_speedup']:.2f}x, geomean {s['geomean_speedup']:.2f}x"
        )
        if s["target"] is not None:
            colour = "green" if s["meets"] else "red"
            text = f"[{colour}]{text} (target >= {s['target']}x)[/]"
        else:
            text += " (no target; for comparison)"
        if len(s["speedups"]) < len(SCALING_CASES):
            text += f" - {len(s['speedups'])} of the {len(SCALING_CASES)} shapes measured"
        lines.append(text)
    return lines


def print_report(document: dict[str, Any], out: Console | None = None) -> None:
    """Machine line, one table per thread count, the summary, the thread scaling, then notes."""
    out = out or console()
    m = document["machine"]
    cores = m["cores"]
    peers = ", ".join(
        f"{p['name']} {p['version']}" if p["available"] else f"{p['name']}: not installed"
        for p in document["peers"].values()
    )
    out.print(
        f"[bold]tconv {document['tconv_version']}[/] on {m['cpu_model']}, "
        f"{cores['physical'] or '?'} cores / {cores['logical']} CPUs ({cores['usable']} usable), "
        f"BLAS {m['blas']}; peers: {peers}; default backend: {document['default_backend']}"
    )
    for threads in sorted({r["threads"] for r in document["results"]}):
        out.print(_case_table(document, threads))
    out.print(_summary_table(document))
    if document.get("scaling"):
        out.print(_scaling_table(document))
        for line in scaling_lines(document):
            out.print(line)
    notes = list(document["notes"])
    mismatched = sorted({f"{s['backend']} at {s['threads']}" for s in document["summary"] if s["blas_threads_mismatch"]})
    if mismatched:
        notes.append(
            f"the core's BLAS was not at the asked thread count after the calls of: {', '.join(mismatched)} "
            f"(fine for a backend that runs its own threads, a bug for one that threads through BLAS)"
        )
    for r in document["results"]:
        for name, peer in r["peers"].items():
            if peer.get("error_vs_reference", 0.0) > document["rtol"]:
                notes.append(
                    f"{r['case']} at {r['threads']} thread(s): {name} differs from {r['reference']} by "
                    f"{peer['error_vs_reference']:.1e} of the output's scale"
                )
    for s in document["summary"]:
        if s["failed"]:
            notes.append(f"{s['backend']} at {s['threads']} thread(s): not timed: {', '.join(s['failed'])}")
    for s in document["summary"]:
        unknown = [_TARGET_LABELS[k] for k, v in s["meets"].items() if v is None]
        if s.get("default") and unknown:
            notes.append(f"{s['backend']} at {s['threads']} thread(s): not measured in this run: {', '.join(unknown)}")
    load = document["machine"].get("load_average")
    usable = document["machine"]["cores"]["usable"] or 1
    if load and load["start"][0] > 0.5:  # at the start the benchmark's own load is not in it yet
        notes.append(
            f"load average {load['start'][0]:.1f} when the run started, on {usable} usable CPUs: other "
            f"processes competed for the cores; multi-thread figures suffer most"
        )
    notes.append(
        "extra MiB: the larger of tracemalloc's peak (NumPy/PyMem allocations) and the resident "
        "high-water growth (every allocator, not reused pages), beyond inputs and output."
    )
    for note in notes:
        out.print(f"[dim]note:[/] {escape(note)}")  # notes quote reasons like "tconv-cupy[cuda12]"


# --------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------- #
def write_json(document: dict[str, Any], path: str) -> None:
    """The whole document, raw timings included."""
    with open(path, "w") as handle:
        json.dump(document, handle, indent=1, default=str)
        handle.write("\n")


def write_plot(document: dict[str, Any], path: str) -> None:
    """PNG: speedup per case against each peer; one panel (bar group) per thread count.

    One row of panels per tconv backend run on the whole suite (the numpy
    reference, run on the seed only, is left out). Bars grow from 1x on a
    log scale: right is faster than the peer, left slower; the dashed line
    is the 0.8x floor of the targets.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    threads = sorted({r["threads"] for r in document["results"]})
    default = document["default_backend"]
    backends = sorted(document["backends"], key=lambda name: (name != default, name))
    backends = [b for b in backends if document["backends"][b]["scope"] == "all"] or backends[:1]
    peer_names = [name for name, p in document["peers"].items() if p["available"]]
    cases = list(dict.fromkeys(r["case"] for r in document["results"]))

    def speedup(n, case, backend, peer):
        for r in document["results"]:
            if r["threads"] == n and r["case"] == case:
                return r["tconv"].get(backend, {}).get("speedup", {}).get(peer, math.nan)
        return math.nan

    values = [speedup(n, c, b, p) for n in threads for c in cases for b in backends for p in peer_names]
    finite = [v for v in values if v == v and v > 0] or [1.0]
    reach = max(2.0, max(finite), 1.0 / min(finite)) * 1.15
    ticks = [t for t in (0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50) if 1 / reach <= t <= reach]

    height = max(2.5, 0.36 * len(cases) + 1.2)
    fig, axes = plt.subplots(
        len(backends), len(threads), figsize=(6.0 * len(threads), height * len(backends)),
        squeeze=False, sharey=True, layout="constrained",
    )
    bar = 0.8 / max(1, len(peer_names))
    for row, backend in enumerate(backends):
        for col, n in enumerate(threads):
            ax = axes[row][col]
            for i, peer in enumerate(peer_names):
                widths = [speedup(n, c, backend, peer) - 1.0 for c in cases]
                positions = [k + (i - (len(peer_names) - 1) / 2) * bar for k in range(len(cases))]
                ax.barh(positions, widths, left=1.0, height=bar, label=f"vs {PEER_LABELS.get(peer, peer)}")
            ax.axvline(1.0, color="black", linewidth=1)
            ax.axvline(TARGETS["min_speedup"], color="red", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            ax.set_xlim(1 / reach, reach)
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.set_yticks(range(len(cases)), cases)
            ax.set_title(f"{backend}, {n} thread{'s' if n > 1 else ''}")
            ax.set_xlabel("speedup = peer time / tconv time")
            ax.grid(axis="x", alpha=0.3)
            if row == 0 and col == 0 and peer_names:
                ax.legend(loc="lower right", fontsize="small")
    axes[0][0].invert_yaxis()  # first case on top; the y axis is shared, so once is enough
    fig.suptitle(f"tconv {document['tconv_version']} vs peers on {document['machine']['cpu_model']}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
