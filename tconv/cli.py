"""The command line: ``python -m tconv info`` and ``python -m tconv explain``.

Only argument parsing and printing live here; the explaining is
:mod:`tconv.explain`. Bad arguments exit with status 2 and, for the layer's
own arguments, the very message the API raises (``explain`` validates them
with the API's code).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import textwrap
from typing import Any, Sequence

import numpy as np

__all__ = ["main", "build_parser", "info_report"]

USAGE_ERROR = 2


class UsageError(Exception):
    """A command-line argument that cannot be read (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    # argparse exits on its own; raising instead lets main() return the status,
    # so the CLI can be driven in-process (tests, notebooks).
    def error(self, message: str):
        raise UsageError(message)


# --------------------------------------------------------------------------- #
# reading the values
# --------------------------------------------------------------------------- #
_SEPARATORS = re.compile(r"[x,]")


def _ints(text: str, option: str, what: str) -> tuple[int, ...]:
    parts = _SEPARATORS.split(text.strip().lower())
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(
            f"{option}: expected {what}, one for every dim or one per spatial dim, got {text!r}"
        ) from None


def parse_sizes(text: str, option: str) -> tuple[int, ...]:
    """``"3x3"``, ``"5"``, ``"4x4x4"`` (or ``"3,3"``) -> a tuple of sizes."""
    sizes = _ints(text, option, "sizes such as 5, 3x3 or 4x4x4")
    if any(s < 0 for s in sizes):
        raise UsageError(f"{option}: sizes must be non-negative, got {text!r}")
    return sizes


def parse_per_dim(text: str, option: str) -> tuple[int, ...]:
    """``"2"`` or ``"1,2"`` -> a tuple of ints (checked later by the API)."""
    return _ints(text, option, "an integer, or integers such as 1,2")


def parse_padding(text: str) -> Any:
    """``"1"``, ``"1,2"``, ``"0:1,1:0"``, ``"same"``, ``"same_lower"``, ``"valid"``."""
    mode = text.strip().lower().replace("-", "_")
    if mode in ("same", "same_lower", "valid", "same_upper"):
        return "same" if mode == "same_upper" else mode  # ONNX's name for "same" is welcome too
    items = []
    try:
        for part in text.split(","):
            if ":" in part:
                begin, end = part.split(":")
                items.append((int(begin), int(end)))
            else:
                items.append(int(part))
    except ValueError:
        raise UsageError(
            "--padding: expected an integer, integers such as 1,2, begin:end pairs such as "
            f"0:1,1:0, or one of same, same_lower, valid; got {text!r}"
        ) from None
    if any(isinstance(i, tuple) for i in items):  # mixed: an int p is the pair p:p
        return tuple(i if isinstance(i, tuple) else (i, i) for i in items)
    return items[0] if len(items) == 1 else tuple(items)


def parse_values(text: str, option: str) -> np.ndarray:
    """Small integer arrays: rows split by ``;``, depth slices by ``|``, numbers by spaces or commas.

    ``"1 2; 3 4"`` is 2x2; ``"1 2 3"`` is a row of 3 (1-D);
    ``"1 2; 3 4 | 5 6; 7 8"`` is 2x2x2.
    """
    try:
        slices = []
        for block in text.split("|"):
            rows = [[float(v) for v in re.split(r"[\s,]+", row.strip()) if v] for row in block.split(";")]
            slices.append(rows)
        array = np.array(slices, dtype=np.float64)
    except ValueError:
        raise UsageError(
            f"{option}: expected numbers with rows split by ';' and depth slices by '|', "
            f"such as '1 2; 3 4'; got {text!r}"
        ) from None
    if "|" not in text:
        array = array[0]
        if ";" not in text:
            array = array[0]
    if np.all(array == np.round(array)):
        array = array.astype(np.int64)
    return array


def _broadcast(values: tuple[int, ...] | None):
    """One value -> an int (the API spreads it); several -> the tuple as given."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def _ndim(args, input_size, kernel_size) -> int:
    """Spatial dims: from the sizes, else from the per-dim options."""
    lengths = [len(s) for s in (input_size, kernel_size) if s is not None and len(s) > 1]
    if lengths:
        if len(set(lengths)) > 1:
            raise UsageError(
                f"--input has {len(input_size)} sizes but --kernel has {len(kernel_size)}; "
                "give one size for every dim or one per spatial dim"
            )
        ndim = lengths[0]
    else:
        others = [args.stride, args.output_padding, args.dilation, args.output_size]
        lengths = [len(v) for v in others if v is not None]
        if isinstance(args.padding, tuple):
            lengths.append(len(args.padding))
        ndim = max(lengths, default=1)
    if ndim not in (1, 2, 3):
        raise UsageError(f"tconv convolves 1, 2 or 3 spatial dims, got {ndim} sizes")
    return ndim


def _spread(sizes: tuple[int, ...], ndim: int, option: str) -> tuple[int, ...]:
    if len(sizes) == 1:
        return sizes * ndim
    if len(sizes) != ndim:
        raise UsageError(f"{option}: expected 1 or {ndim} sizes (one per spatial dim), got {len(sizes)}")
    return sizes


# --------------------------------------------------------------------------- #
# info
# --------------------------------------------------------------------------- #
def info_report() -> dict:
    """What ``python -m tconv info`` prints, as a dict (also ``info --json``)."""
    import threadpoolctl

    from . import __version__
    from ._threads import blas_info
    from .registry import BackendError, get_backend, get_num_threads, list_backends, resolve_backend

    backends = []
    for info in list_backends():
        entry = {"name": info.name, "available": info.available, "reason": info.reason,
                 "description": info.description}
        if info.available:
            entry.update(_backend_threads(resolve_backend(info.name)))
        backends.append(entry)
    try:
        default = get_backend()
        default_error = None
    except BackendError as exc:
        default, default_error = None, str(exc)
    try:
        threads = get_num_threads()
        threads_error = None
    except ValueError as exc:
        threads, threads_error = None, str(exc)
    # A fresh scan: plugins loaded above may have brought their OpenMP runtime.
    openmp = [
        {"library": lib.get("internal_api"), "version": lib.get("version"),
         "num_threads": lib.get("num_threads"), "path": lib.get("filepath")}
        for lib in threadpoolctl.threadpool_info() if lib.get("user_api") == "openmp"
    ]
    import scipy

    return {
        "version": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "default_backend": default,
        "default_backend_error": default_error,
        "TCONV_BACKEND": os.environ.get("TCONV_BACKEND") or None,
        "backends": backends,
        "blas": [
            {"library": lib.get("internal_api"), "version": lib.get("version"),
             "num_threads": lib.get("num_threads"), "threading_layer": lib.get("threading_layer"),
             "architecture": lib.get("architecture"), "path": lib.get("filepath"),
             "used_by": _blas_user(lib.get("filepath") or "")}
            for lib in blas_info()
        ],
        "core_blas": _core_blas(),
        "num_threads": threads,
        "num_threads_error": threads_error,
        "TCONV_NUM_THREADS": os.environ.get("TCONV_NUM_THREADS") or None,
        "openmp": openmp,
    }


def _core_blas() -> dict | None:
    """The BLAS the core chose (``TCONV_BLAS``), with why; None where the core is not built."""
    from . import _blas_library

    choice = _blas_library.chosen()
    if choice is None:
        return None
    from . import _blas_core

    return {"name": choice.name, "path": choice.path, "reason": choice.reason,
            "TCONV_BLAS": os.environ.get("TCONV_BLAS") or None,
            "unpacked_kernel": _blas_core.small_gemm_available()}


def _blas_user(path: str) -> str:
    """Who calls a BLAS library: the core (``_blas_library``), else guessed from the
    folder its wheel put it in (the wheels all name it ``libscipy_openblas``)."""
    from . import _blas_library

    if _blas_library.core_calls(path):
        return "the compiled core: the blas and openmp backends' GEMM"
    folder = os.path.basename(os.path.dirname(path))
    if folder.startswith("scipy"):
        return "SciPy (scipy.linalg)"
    if folder.startswith("numpy"):
        return "NumPy (the numpy backend's matmul and tensordot)"
    return ""


def _backend_threads(backend) -> dict:
    """The hook for multicore backends: an optional ``thread_info()`` (a str or
    a dict) or ``num_threads()`` (an int) on the backend object is reported."""
    for attr in ("thread_info", "num_threads"):
        method = getattr(backend, attr, None)
        if callable(method):
            try:
                return {"threads": method()}
            except Exception as exc:  # a plugin's report must not break `info`
                return {"threads": f"{attr}() failed: {exc!r}"}
    return {}


def _print_info(report: dict, out) -> None:
    p = lambda text="": print(text, file=out)  # noqa: E731
    p(f"tconv {report['version']}  (Python {report['python']}, NumPy {report['numpy']}, "
      f"SciPy {report['scipy']})")
    p()
    if report["default_backend"]:
        how = (f"from TCONV_BACKEND={report['TCONV_BACKEND']}" if report["TCONV_BACKEND"]
               else "the fastest available; TCONV_BACKEND chooses another")
        p(f"Backends (default: {report['default_backend']}, {how}):")
    else:
        p(f"Backends (no default: {report['default_backend_error']}):")
    width = max((len(b["name"]) for b in report["backends"]), default=4)
    for b in report["backends"]:
        mark = "*" if b["name"] == report["default_backend"] else " "
        state = "available  " if b["available"] else "unavailable"
        p(f"  {mark} {b['name']:<{width}}  {state}  {b['description']}".rstrip())
        if not b["available"] and b["reason"]:
            p(f"    {' ' * width}  reason: {b['reason']}")
        if "threads" in b:
            p(f"    {' ' * width}  threads: {b['threads']}")
    p()
    p("BLAS:")
    core = report["core_blas"]
    if core:
        p(f"  the core calls {core['name']}'s GEMM" + (f" ({core['reason']})" if core["reason"] else "")
          + "; TCONV_BLAS=scipy or scipy-openblas32 chooses")
        p("  and its own AVX-512 kernel for most float32 GEMMs (TCONV_SMALL_GEMM=0 turns it off)"
          if core["unpacked_kernel"] else
          "  (its own AVX-512 kernel is off: no AVX-512F, or TCONV_SMALL_GEMM=0; every GEMM is BLAS's)")
    if not report["blas"]:
        p("  none found by threadpoolctl")
    for lib in report["blas"]:
        details = ", ".join(str(v) for v in (lib["threading_layer"], lib["architecture"]) if v)
        p(f"  {lib['library']} {lib['version'] or ''} ({details}): {lib['num_threads']} threads")
        if lib["used_by"]:
            p(f"    used by {lib['used_by']}")
        p(f"    {lib['path']}")
    p()
    if report["num_threads"] is None:
        p(f"tconv threads: {report['num_threads_error']}")
    else:
        source = (f"TCONV_NUM_THREADS={report['TCONV_NUM_THREADS']}" if report["TCONV_NUM_THREADS"]
                  else "the cores this process may use; TCONV_NUM_THREADS or tconv.set_num_threads() bound it")
        p(f"tconv threads: {report['num_threads']} ({source})")
    if report["openmp"] or any(b["name"] == "openmp" for b in report["backends"]):
        p("OpenMP:")
        if not report["openmp"]:
            p("  no OpenMP runtime loaded")
        for lib in report["openmp"]:
            p(f"  {lib['library']} {lib['version'] or ''}: {lib['num_threads']} threads  {lib['path']}")


# --------------------------------------------------------------------------- #
# explain
# --------------------------------------------------------------------------- #
def _use_color(args, stream) -> bool:
    if args.no_color:
        return False
    if args.color:
        return True
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def _can_print_unicode(stream) -> bool:
    encoding = getattr(stream, "encoding", None)
    if encoding is None:  # a text buffer (io.StringIO): no bytes, no limits
        return True
    try:
        "·─│┌┐└┘".encode(encoding)
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def _api_error(exc: Exception, err) -> int:
    from .explain import why

    message = str(exc)
    print(f"error: {message}", file=err)
    reason = why(message)
    if reason:
        print(textwrap.fill(reason, 88, initial_indent="why: ", subsequent_indent="     "), file=err)
    return USAGE_ERROR


def _explain(args, out, err) -> int:
    from . import explain

    if (args.source is None) != (args.target is None):
        raise UsageError("--from and --to go together: the size you have and the size you want")
    if args.source is not None:
        source = parse_sizes(args.source, "--from")
        target = parse_sizes(args.target, "--to")
        ndim = max(len(source), len(target))
        source, target = _spread(source, ndim, "--from"), _spread(target, ndim, "--to")
        if args.limit < 1:
            raise UsageError(f"--limit must be a positive integer, got {args.limit}")
        if min(source + target) < 1:
            raise UsageError(f"--from and --to sizes must be positive, got {args.source!r} and {args.target!r}")
        print(explain.render_solutions(source, target, limit=args.limit), file=out)
        return 0

    x_values = parse_values(args.input_values, "--input-values") if args.input_values else None
    w_values = parse_values(args.kernel_values, "--kernel-values") if args.kernel_values else None
    input_size = parse_sizes(args.input, "--input") if args.input else (x_values.shape if x_values is not None else None)
    kernel_size = parse_sizes(args.kernel, "--kernel") if args.kernel else (w_values.shape if w_values is not None else None)
    if input_size is None or kernel_size is None:
        raise UsageError("explain needs --input and --kernel (sizes such as 3x3), or --from and --to")
    args.stride = parse_per_dim(args.stride, "--stride")
    args.dilation = parse_per_dim(args.dilation, "--dilation")
    args.output_padding = parse_per_dim(args.output_padding, "--output-padding")
    args.output_size = parse_sizes(args.output_size, "--output-size") if args.output_size else None
    args.padding = parse_padding(args.padding)
    ndim = _ndim(args, input_size, kernel_size)
    input_size = _spread(tuple(input_size), ndim, "--input")
    kernel_size = _spread(tuple(kernel_size), ndim, "--kernel")
    output_size = None
    if args.output_size is not None:
        output_size = _spread(args.output_size, ndim, "--output-size")

    try:
        layer = explain.analyse(
            input_size, kernel_size, stride=_broadcast(args.stride), padding=args.padding,
            output_padding=_broadcast(args.output_padding),
            dilation=_broadcast(args.dilation), output_size=output_size,
        )
    except (ValueError, TypeError) as exc:
        return _api_error(exc, err)

    color = _use_color(args, out)
    ascii_only = not _can_print_unicode(out)
    print(explain.describe(layer), file=out)
    print(file=out)
    print("\n".join(explain.derivation(layer)), file=out)
    print(file=out)
    if explain.picture_too_large(layer):
        sides = explain.format_size(explain.drawn_size(layer))
        print(f"(No picture: the full grid is {sides}, more than fits a terminal; "
              "the pattern is the same on smaller sizes.)", file=out)
    else:
        print(explain.render_grid(layer, color=color, cells=args.cells, ascii_only=ascii_only), file=out)

    status = 0
    if args.values or x_values is not None or w_values is not None:
        x_default, w_default = explain.default_values(layer)
        x = x_default if x_values is None else x_values
        w = w_default if w_values is None else w_values
        for given, expected, option in ((x, layer.input_size, "--input-values"), (w, layer.kernel_size, "--kernel-values")):
            if tuple(np.shape(given)) != tuple(expected):
                raise UsageError(
                    f"{option}: the values have shape {format_shape(np.shape(given))}, "
                    f"the sizes say {format_shape(expected)}"
                )
        print(file=out)
        width = shutil.get_terminal_size((100, 24)).columns
        try:
            print(explain.render_values(layer, x, w, backend=args.backend, max_width=width), file=out)
        except (ValueError, TypeError) as exc:
            return _api_error(exc, err)

    if args.png:
        if explain.picture_too_large(layer, limit_side=10**9, limit_cells=explain.MAX_PNG_CELLS):
            print(f"error: --png: the full grid {explain.format_size(explain.drawn_size(layer))} "
                  "is too large to draw", file=err)
            return 1
        try:
            explain.draw_png(layer, args.png, cells=args.cells)
        except ImportError:
            print("error: --png needs matplotlib, which is not installed; install it with\n"
                  "    pip install matplotlib      (or: pip install 'tconv[plot]')", file=err)
            return 1
        except OSError as exc:
            print(f"error: --png: cannot write {args.png!r}: {exc}", file=err)
            return 1
        print(f"\nWrote {args.png}", file=out)
    return status


def format_shape(sizes: Sequence[int]) -> str:
    return "x".join(str(s) for s in sizes) or "a single number"


# --------------------------------------------------------------------------- #
# parser and entry point
# --------------------------------------------------------------------------- #
def build_parser() -> argparse.ArgumentParser:
    """The ``python -m tconv`` parser."""
    parser = _Parser(prog="python -m tconv", description="tconv: transposed convolution for NumPy.")
    commands = parser.add_subparsers(dest="command", metavar="{info,explain}")
    commands.required = True

    info = commands.add_parser(
        "info", help="version, backends, BLAS and threads",
        description="Version, each backend with its availability, the BLAS library and thread counts.",
    )
    info.add_argument("--json", action="store_true", help="print the report as JSON")

    ex = commands.add_parser(
        "explain", help="why the output has its size, and where each input value goes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Explain a transposed convolution with your numbers: the output-size formula step\n"
            "by step, and a picture of where each input cell's kernel lands on the output.\n"
            "Every option takes one value for every dim or one per spatial dim."
        ),
        epilog=(
            "examples:\n"
            "  python -m tconv explain --input 3x3 --kernel 3x3 --stride 3 --output-padding 1\n"
            "  python -m tconv explain --input 4 --kernel 3 --stride 2 --padding 1 --values\n"
            "  python -m tconv explain --input 3x3 --kernel 4x4 --stride 2 --padding 1 --png out.png\n"
            "  python -m tconv explain --from 7x7 --to 14x14"
        ),
    )
    layer = ex.add_argument_group("the layer")
    layer.add_argument("--input", metavar="SIZES", help="input spatial size: 5, 3x3, 4x4x4")
    layer.add_argument("--kernel", metavar="SIZES", help="kernel size: 3, 3x3, 3x3x3")
    layer.add_argument("--stride", default="1", metavar="INTS", help="1 or 1,2 (default 1)")
    layer.add_argument(
        "--padding", default="0", metavar="PAD",
        help="cells cropped per side: 1, per dim 1,2, begin:end pairs 0:1,1:0, or same, same_lower, valid",
    )
    layer.add_argument("--output-padding", default="0", metavar="INTS", help="cells added at the end (default 0)")
    layer.add_argument("--dilation", default="1", metavar="INTS", help="spacing of kernel taps (default 1)")
    layer.add_argument("--output-size", metavar="SIZES",
                       help="the output size wanted: shows the output_padding it implies")
    show = ex.add_argument_group("the picture")
    show.add_argument("--cells", choices=("auto", "names", "count"), default="auto",
                      help="output cells show the input cells' names or how many land (default auto)")
    show.add_argument("--no-color", action="store_true", help="no colours (also when not a terminal, or NO_COLOR is set)")
    show.add_argument("--color", action="store_true", help="colours even when not a terminal")
    show.add_argument("--png", metavar="FILE", help="also draw the picture to FILE (needs matplotlib)")
    values = ex.add_argument_group("values")
    values.add_argument("--values", action="store_true",
                        help="compute the output with the engine (input of ones, kernel 1..k^2 unless given)")
    values.add_argument("--input-values", metavar="NUMBERS",
                        help="the input, rows split by ';', depth slices by '|': '1 2; 3 4' (implies --values)")
    values.add_argument("--kernel-values", metavar="NUMBERS", help="the kernel, as --input-values")
    values.add_argument("--backend", metavar="NAME", help="backend for --values (default: the one in force)")
    solve = ex.add_argument_group("which layer maps size A to size B")
    solve.add_argument("--from", dest="source", metavar="SIZES", help="the size you have: 7 or 7x7")
    solve.add_argument("--to", dest="target", metavar="SIZES", help="the size you want: 14 or 14x14")
    solve.add_argument("--limit", type=int, default=8, help="how many choices per dim (default 8)")
    return parser


def main(argv: Sequence[str] | None = None, *, stdout=None, stderr=None) -> int:
    """Run the command line; returns the exit status (2: bad arguments).

    Examples
    --------
    >>> main(["explain", "--from", "7", "--to", "14", "--limit", "1"])  # doctest: +ELLIPSIS
    transposed convolutions that map 7 to 14 ...
    0
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "info":
            report = info_report()
            if args.json:
                print(json.dumps(report, indent=2), file=out)
            else:
                _print_info(report, out)
            return 0
        return _explain(args, out, err)
    except UsageError as exc:
        print(f"error: {exc}", file=err)
        print("(python -m tconv explain --help lists the options)", file=err)
        return USAGE_ERROR
    except SystemExit as exc:  # --help and --version end here
        return exc.code if isinstance(exc.code, int) else 0
