"""``python -m bench``: the command line of the benchmark suite."""

from __future__ import annotations

import argparse
import sys

from . import layers, report
from .suite import Options, choose_backends, run_suite, scaling_plan


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace] | None:
    """The options to run with, or None when nothing is to be run (``--list``)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Time tconv on real network layers (float32, NCHW) against PyTorch and ONNX Runtime "
            "at 1 and 2 threads: check each result first, then report median time, GFLOP/s, "
            "fraction of the measured GEMM peak, speedups and extra memory."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="a subset that runs in under two minutes")
    parser.add_argument("--layers", nargs="+", metavar="SUBSTR", help="cases whose name contains any SUBSTR")
    parser.add_argument("--backends", nargs="+", metavar="NAME", help="tconv backends to run (default: all available)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], metavar="N", help="thread counts (default: 1 2)")
    parser.add_argument("--repeat", type=int, default=None, metavar="N", help="timed samples per call (default 7, 5 with --quick)")
    parser.add_argument("--json", metavar="PATH", help="write every figure, raw timings and the machine to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart of the speedups to PATH")
    parser.add_argument("--split", action="store_true", help="also time the bare GEMMs of each case (GEMM share column)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the extra-memory measurement")
    parser.add_argument(
        "--no-scaling", dest="scaling", action="store_false",
        help="skip the thread-scaling measurement (lowest vs highest --threads, timed side by side, on the large shapes)",
    )
    parser.add_argument("--gemm-size", type=int, default=None, metavar="N", help="size of the GEMM-peak sgemm (default 2048, 1536 with --quick)")
    parser.add_argument("--list", action="store_true", help="list the cases and backends, run nothing")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.threads):
        parser.error(f"--threads must be positive, got {args.threads}")
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat must be positive, got {args.repeat}")
    if args.list:
        for case in layers.select(args.layers, args.quick):
            print(f"{case.name:24} {case.direction:8} {case.layer.describe():36} {case.layer.network}")
        try:
            backends, notes = choose_backends(args.backends)
        except ValueError as exc:
            parser.error(str(exc))
        print("backends:", ", ".join(f"{name} ({scope})" for name, scope in backends.items()))
        for note in notes:
            print("note:", note)
        return None
    try:
        layers.select(args.layers, args.quick)
    except ValueError as exc:
        parser.error(str(exc))
    return Options(
        layers=args.layers,
        backends=args.backends,
        threads=args.threads,
        repeat=args.repeat or (5 if args.quick else 7),
        quick=args.quick,
        split=args.split,
        memory=args.memory,
        scaling=args.scaling,
        gemm_size=args.gemm_size or (1536 if args.quick else 2048),
    ), args


def main(argv: list[str] | None = None) -> int:
    parsed = parse_args(argv)
    if parsed is None:
        return 0
    options, args = parsed
    try:
        backends, _ = choose_backends(options.backends)
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    units = len(options.threads) * (1 + len(layers.select(options.layers, options.quick)))
    units += len(scaling_plan(options, backends))
    with report.progress(units, enabled=sys.stderr.isatty()) as step:
        document = run_suite(options, step)
    report.print_report(document)
    if args.json:
        report.write_json(document, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        report.write_plot(document, args.plot)
        print(f"wrote {args.plot}")
    failed = any(s["failed"] for s in document["summary"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
