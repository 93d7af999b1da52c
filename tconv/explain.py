"""What a transposed convolution does, told with the user's own numbers.

``python -m tconv explain`` is assembled from the pieces here:

- :func:`analyse` checks the arguments with the API's own validation (so the
  errors are the API's, word for word) and resolves every number;
- :func:`derivation` writes the output-size formula with those numbers;
- :func:`footprint` scatters every input cell over the full, uncropped output
  grid (SPEC's definition, cell by cell);
- :func:`render_grid` draws that grid as text, :func:`draw_png` as an image;
- :func:`render_values` runs the engine itself on small integers;
- :func:`render_solutions` answers "which layer maps size A to size B".

Coordinates: ``u`` is a position on the full grid, where input cell ``i``
and kernel tap ``a`` meet at ``u = i * stride + a * dilation``. The output is
the window ``pad_begin <= u < pad_begin + out``: cells before and after it are
computed and then cropped by padding, and output index ``o`` is ``u - pad_begin``.
"""

from __future__ import annotations

import itertools
import math
import string
import textwrap
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import shape

__all__ = [
    "Layer",
    "analyse",
    "why",
    "derivation",
    "footprint",
    "render_grid",
    "render_values",
    "render_solutions",
    "draw_png",
    "PNG_CELL_INCHES",
    "PNG_DPI",
    "png_layout",
]

DIM_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}

# Past these the picture stops teaching anything (the pattern repeats) and
# stops fitting a terminal or a page.
MAX_TEXT_SIDE = 64
MAX_TEXT_CELLS = 4096
MAX_PNG_CELLS = 40_000
# Names are letters; past this many input cells, output cells show counts.
NAMES = string.ascii_lowercase + string.ascii_uppercase
# More names than this in one output cell make the grid too wide to read.
MAX_NAMES_PER_CELL = 4

# Pastel xterm-256 background colours, readable with black text on dark and
# light terminals; the PNG uses the same colours (see _xterm_rgb), so the
# terminal and the image tell the same story. Neighbours in the list differ
# in hue, so neighbouring input cells never look alike.
PALETTE = (210, 114, 111, 221, 176, 80, 215, 147, 156, 117, 218, 187)
GREYS = (252, 249, 246, 243)  # backgrounds of cells reached by 2, 3, 4+ inputs
ADDED_COLOUR = 178  # gold: what output_padding adds
MUTED_COLOUR = 244


# --------------------------------------------------------------------------- #
# the problem, validated and resolved
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Layer:
    """One transposed convolution's geometry, every number resolved per dim.

    Build it with :func:`analyse`. ``output_padding`` is the one in force (the
    one ``output_size`` chose, when given); ``api_kwargs`` repeats the call as
    the user wrote it, for running the engine.
    """

    input_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_begin: tuple[int, ...]
    pad_end: tuple[int, ...]
    output_padding: tuple[int, ...]
    output_size: tuple[int, ...]
    padding: Any = 0
    requested_size: tuple[int, ...] | None = None
    api_kwargs: dict = field(default_factory=dict, compare=False)

    @property
    def ndim(self) -> int:
        return len(self.input_size)

    @property
    def fname(self) -> str:
        return f"conv_transpose{self.ndim}d"

    @property
    def same_mode(self) -> bool:
        return isinstance(self.padding, str) and self.padding.lower() in ("same", "same_lower")

    @property
    def full_size(self) -> tuple[int, ...]:
        """The uncropped grid every tap lands on: ``(in - 1) * stride + dilation * (k - 1) + 1``."""
        return tuple(
            (i - 1) * s + d * (k - 1) + 1
            for i, s, d, k in zip(self.input_size, self.stride, self.dilation, self.kernel_size)
        )

    @property
    def added(self) -> tuple[int, ...]:
        """Cells output_padding adds at the end of each dim (none in the "same" modes,
        where it only moves the crop)."""
        return (0,) * self.ndim if self.same_mode else self.output_padding


def analyse(
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    dilation: Any = 1,
    output_size: Sequence[int] | None = None,
) -> Layer:
    """Validate a transposed convolution exactly as the API does and resolve its numbers.

    Parameters
    ----------
    input_size, kernel_size : sequence of int
        Spatial sizes, one per dim (1 to 3 dims).
    stride, padding, output_padding, dilation, output_size
        As for ``tconv.conv_transpose{1,2,3}d``.

    Returns
    -------
    Layer

    Raises
    ------
    ValueError, TypeError
        The API's own error for these arguments, word for word.
    """
    import tconv  # deferred: keeps `import tconv.explain` light

    inp = tuple(int(v) for v in input_size)
    kernel = tuple(int(v) for v in kernel_size)
    ndim = len(inp)
    if ndim not in (1, 2, 3) or len(kernel) != ndim:
        raise ValueError(
            f"input_size and kernel_size must both have 1, 2 or 3 sizes, got {inp} and {kernel}"
        )
    for sizes, name in ((inp, "input_size"), (kernel, "kernel_size")):
        if min(sizes) < 0:
            raise ValueError(f"{name} must be non-negative, got {sizes}")
    # The public function itself on empty stand-ins (no samples, no output
    # channels): its own checks, its own messages, its own output shape, and
    # nothing allocated or computed, however large the sizes.
    try:
        x = np.zeros((0, 1, *inp), dtype=bool)
        weight = np.zeros((1, 0, *kernel), dtype=bool)
    except (ValueError, MemoryError):
        raise ValueError(f"input_size {inp} or kernel_size {kernel} is too large") from None
    api = getattr(tconv, f"conv_transpose{ndim}d")
    result = api(x, weight, stride=stride, padding=padding, output_padding=output_padding,
                 dilation=dilation, output_size=output_size, backend="numpy")
    out_size = tuple(result.shape[2:])
    # The same resolution steps as the API's, now that it has accepted them.
    strides = shape.per_dim(stride, ndim, "stride")
    dilations = shape.per_dim(dilation, ndim, "dilation")
    out_pad = shape.per_dim(output_padding, ndim, "output_padding")
    wanted = None if output_size is None else out_size
    same = isinstance(padding, str) and padding.lower() in ("same", "same_lower")
    begin, end = shape.resolve_padding(
        padding, inp, kernel, strides, dilations, out_pad,
        transposed=True, output_size=wanted if same else None,
    )
    if wanted is not None and not same:
        out_pad = shape.output_padding_for(inp, wanted, kernel, strides, tuple(zip(begin, end)), dilations)
    return Layer(
        input_size=inp, kernel_size=kernel, stride=strides, dilation=dilations,
        pad_begin=begin, pad_end=end, output_padding=out_pad,
        output_size=out_size, padding=padding, requested_size=wanted,
        api_kwargs=dict(stride=stride, padding=padding, output_padding=output_padding,
                        dilation=dilation, output_size=output_size),
    )


# One sentence per rule, matched on the API's message: the rule's reason.
_REASONS = (
    ("output_padding must be smaller than stride or dilation",
     "output_padding exists only to choose among the `stride` output sizes that a strided "
     "convolution would all shrink back to the same input size, so it must stay below the "
     "stride (PyTorch also accepts below the dilation); use padding or another layer to go further."),
    ("is not reachable",
     "output_padding can add only 0 .. stride-1 cells, so one kernel, stride and padding reach "
     "exactly `stride` consecutive sizes; change those to reach others "
     "(`python -m tconv explain --from IN --to OUT` lists choices)."),
    ("stride must be positive",
     "the stride is the step between the places where consecutive input cells put their kernel; "
     "a step of zero or less has no meaning."),
    ("dilation must be positive",
     "the dilation is the spacing between kernel taps; taps zero apart would sit on each other."),
    ("output_padding must be non-negative",
     "output_padding adds cells at the end of the output; to remove cells, use padding."),
    ("padding must be non-negative",
     "padding crops cells off the full output (it is the padding of the convolution this one "
     "transposes); a negative crop would invent cells: use output_padding or output_size to grow "
     "the output."),
    ("output size",
     "padding crops pad_begin + pad_end cells off the full output, and here that is everything."),
    ("output_size must be positive",
     "an output needs at least one cell per dim."),
    ("kernel size",
     "an empty kernel has nothing to put on the output."),
    ("x spatial size must be positive",
     "an empty input has nothing to scatter."),
    ("too large",
     "tconv refuses sizes that cannot be allocated before doing arithmetic that could overflow."),
    ("must be an int or",
     "each option takes one value for every dim, or one value per spatial dim."),
    ("must be an integer",
     "sizes, strides and paddings count cells, so they are whole numbers."),
    ("padding must be",
     "padding is a number of cells cropped per dim (an int, one per dim, or begin:end pairs) "
     "or one of the modes valid, same, same_lower."),
)


def why(message: str) -> str | None:
    """One sentence on why the rule behind an API error ``message`` exists (None if unknown)."""
    for needle, reason in _REASONS:
        if needle in message:
            return reason
    return None


# --------------------------------------------------------------------------- #
# formatting helpers
# --------------------------------------------------------------------------- #
def format_dims(values: Sequence[int], sep: str = ",") -> str:
    """``(3, 3)`` -> ``"3"``; ``(1, 2)`` -> ``"1,2"``: one value when all dims agree."""
    values = tuple(values)
    if len(set(values)) == 1:
        return str(values[0])
    return sep.join(str(v) for v in values)


def format_size(values: Sequence[int]) -> str:
    """``(10, 10)`` -> ``"10x10"``."""
    return "x".join(str(v) for v in values)


def format_padding(layer: Layer) -> str:
    if isinstance(layer.padding, str):
        return layer.padding
    if layer.pad_begin == layer.pad_end:
        return format_dims(layer.pad_begin)
    return ",".join(f"{b}:{e}" for b, e in zip(layer.pad_begin, layer.pad_end))


def describe(layer: Layer) -> str:
    """The call in one line, with the numbers in force."""
    parts = [
        f"input {format_size(layer.input_size)}",
        f"kernel {format_size(layer.kernel_size)}",
        f"stride {format_dims(layer.stride)}",
        f"padding {format_padding(layer)}",
        f"output_padding {format_dims(layer.output_padding)}",
        f"dilation {format_dims(layer.dilation)}",
    ]
    if layer.requested_size is not None:
        parts.append(f"output_size {format_size(layer.requested_size)}")
    return f"{layer.fname}: " + ", ".join(parts)


def _minus(value: int) -> str:
    return f"- {value}" if value >= 0 else f"- ({value})"


# --------------------------------------------------------------------------- #
# the derivation
# --------------------------------------------------------------------------- #
def derivation(layer: Layer) -> list[str]:
    """The output-size formula, then each dim with the numbers put in, step by step."""
    lines = []
    names = DIM_NAMES[layer.ndim]
    lines.extend(_padding_story(layer))
    lines.append("Output size, per spatial dim:")
    lines.append(
        "  out = (in - 1) * stride - pad_begin - pad_end + dilation * (kernel - 1) + output_padding + 1"
    )
    width = max(len(n) for n in names)
    seen: dict[tuple, str] = {}
    for dim, name in enumerate(names):
        i, k, s = layer.input_size[dim], layer.kernel_size[dim], layer.stride[dim]
        b, e = layer.pad_begin[dim], layer.pad_end[dim]
        d, o = layer.dilation[dim], layer.output_padding[dim]
        out = layer.output_size[dim]
        assert (i - 1) * s - b - e + d * (k - 1) + o + 1 == out  # the API and the formula agree
        key = (i, k, s, b, e, d, o)
        head = f"  {name:<{width}}  "
        if key in seen:
            lines.append(f"{head}same numbers as {seen[key]}: {out}")
            continue
        seen[key] = name
        pad = " " * (len(head) - 2)
        lines.append(f"{head}({i} - 1) * {s} {_minus(b)} {_minus(e)} + {d} * ({k} - 1) + {o} + 1")
        lines.append(f"{pad}= {(i - 1) * s} {_minus(b)} {_minus(e)} + {d * (k - 1)} + {o} + 1")
        lines.append(f"{pad}= {out}")
    spatial = format_size(layer.output_size)
    lines.append(
        f"Output shape: {spatial}  (input (N, C_in, {', '.join(map(str, layer.input_size))}) "
        f"gives (N, C_out, {', '.join(map(str, layer.output_size))}))"
    )
    return lines


def _padding_story(layer: Layer) -> list[str]:
    """How padding and output_padding were decided, when there is something to say."""
    lines = []
    names = DIM_NAMES[layer.ndim]
    if layer.same_mode:
        mode = layer.padding.lower()
        onnx = "SAME_UPPER" if mode == "same" else "SAME_LOWER"
        odd = "end" if mode == "same" else "start"
        if layer.requested_size is None:
            target = "in * stride"
            wanted = tuple(i * s for i, s in zip(layer.input_size, layer.stride))
        else:
            target = "output_size"
            wanted = layer.requested_size
        lines.append(f"padding {mode!r} (ONNX {onnx}) wants out = {target}: it crops")
        lines.append("full + output_padding - out cells, where full = (in - 1) * stride + dilation * (kernel - 1) + 1,")
        lines.append(f"and splits them in two halves, the odd cell at the {odd}:")
        for dim, name in enumerate(names):
            total = layer.pad_begin[dim] + layer.pad_end[dim]
            lines.append(
                f"  {name}: full = {layer.full_size[dim]}, out = {wanted[dim]}, crop = {layer.full_size[dim]} + "
                f"{layer.output_padding[dim]} - {wanted[dim]} = {total} "
                f"-> pad_begin {layer.pad_begin[dim]}, pad_end {layer.pad_end[dim]}"
            )
        if any(t < 0 for t in (b + e for b, e in zip(layer.pad_begin, layer.pad_end))):
            lines.append("  (a negative crop adds cells that no input reaches)")
    elif layer.requested_size is not None:
        lines.append("output_size chooses output_padding (PyTorch's rule): output_padding 0 gives the")
        lines.append("smallest size, and each of 1 .. stride-1 one cell more:")
        for dim, name in enumerate(names):
            smallest = layer.output_size[dim] - layer.output_padding[dim]
            top = smallest + layer.stride[dim] - 1
            lines.append(
                f"  {name}: reachable {smallest}..{top}, so {layer.requested_size[dim]} "
                f"needs output_padding {layer.output_padding[dim]}"
            )
    if lines:
        lines.append("")
    return lines


# --------------------------------------------------------------------------- #
# the scatter, cell by cell
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Axis:
    """One dim of the drawn grid, in full-grid coordinates ``u``."""

    start: int  # first drawn u (negative when a negative crop adds cells before the full grid)
    stop: int
    keep_start: int  # the output is keep_start <= u < keep_stop
    keep_stop: int
    added_start: int  # output_padding's cells: added_start <= u < keep_stop

    def kind(self, u: int) -> str:
        if not self.keep_start <= u < self.keep_stop:
            return "crop"
        if u >= self.added_start:
            return "added"
        return "out"

    def index(self, u: int) -> int | None:
        """Output index of ``u``, None when cropped."""
        return u - self.keep_start if self.keep_start <= u < self.keep_stop else None

    @property
    def size(self) -> int:
        return self.stop - self.start


_FLAT = Axis(0, 1, 0, 1, 1)  # the unit dim that lifts 1-D and 2-D problems to 3-D


@dataclass(frozen=True)
class Footprint:
    """Which input cells land on every cell of the full grid (lifted to 3 dims)."""

    axes: tuple[Axis, Axis, Axis]
    input_size: tuple[int, int, int]
    landing: dict  # (u_depth, u_row, u_col) -> list of flat input indices
    ndim: int

    @property
    def inputs(self) -> int:
        return math.prod(self.input_size)

    def kind(self, cell: tuple[int, int, int]) -> str:
        kinds = [axis.kind(u) for axis, u in zip(self.axes, cell)]
        if "crop" in kinds:
            return "crop"
        return "added" if "added" in kinds else "out"

    @property
    def most(self) -> int:
        return max((len(v) for v in self.landing.values()), default=0)


def drawn_size(layer: Layer) -> tuple[int, ...]:
    """Per dim, how many cells the picture has: the full grid and every output cell."""
    return tuple(
        max(full, b + out) - min(0, b)
        for full, b, out in zip(layer.full_size, layer.pad_begin, layer.output_size)
    )


def footprint(layer: Layer) -> Footprint:
    """Scatter every input cell over the full grid, as SPEC defines it.

    Input cell ``i`` with kernel tap ``a`` lands on ``u = i * stride + a * dilation``
    in each dim; the output keeps ``pad_begin <= u < pad_begin + out``.
    """
    axes = []
    for full, b, out, added in zip(layer.full_size, layer.pad_begin, layer.output_size, layer.added):
        axes.append(Axis(min(0, b), max(full, b + out), b, b + out, b + out - added))
    lift = 3 - layer.ndim
    axes = (_FLAT,) * lift + tuple(axes)
    inp = (1,) * lift + layer.input_size
    kernel = (1,) * lift + layer.kernel_size
    stride = (1,) * lift + layer.stride
    dilation = (1,) * lift + layer.dilation
    landing: dict = {}
    for flat, cell in enumerate(itertools.product(*(range(n) for n in inp))):
        for tap in itertools.product(*(range(n) for n in kernel)):
            u = tuple(c * s + t * d for c, s, t, d in zip(cell, stride, tap, dilation))
            landing.setdefault(u, []).append(flat)
    return Footprint(tuple(axes), inp, landing, layer.ndim)


def cell_names(count: int) -> list[str] | None:
    """Letters for ``count`` input cells, row by row; None when there are too many."""
    return list(NAMES[:count]) if count <= len(NAMES) else None


# --------------------------------------------------------------------------- #
# text picture
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Glyphs:
    empty: str
    added: str
    h: str
    v: str
    tl: str
    tr: str
    bl: str
    br: str


UNICODE = Glyphs("·", "+", "─", "│", "┌", "┐", "└", "┘")
ASCII = Glyphs(".", "+", "-", "|", "+", "+", "+", "+")


class _Paint:
    """ANSI colours, or nothing at all."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str, sgr: str | None) -> str:
        if not self.enabled or not sgr or not text:
            return text
        return f"\x1b[{sgr}m{text}\x1b[0m"

    @staticmethod
    def block(colour: int) -> str:
        return f"38;5;16;48;5;{colour}"

    @staticmethod
    def fg(colour: int) -> str:
        return f"38;5;{colour}"


def input_colour(flat: int, input_size: tuple[int, int, int]) -> int:
    """The xterm-256 colour of input cell ``flat`` (row by row) of a lifted 3-D input.

    The palette in order, so small inputs get distinct colours; where a row
    (or a slice) is a whole number of palettes long, each row (slice) shifts
    by one, so that no two neighbours ever share a colour.
    """
    _, height, width = input_size
    depth_index, rest = divmod(flat, height * width)
    row = rest // width
    shift = (row if width % len(PALETTE) == 0 else 0) + (
        depth_index if (height * width) % len(PALETTE) == 0 else 0
    )
    return PALETTE[(flat + shift) % len(PALETTE)]


def _content(fp: Footprint, cell, names: list[str] | None, glyphs: Glyphs) -> str:
    who = fp.landing.get(cell, ())
    if not who:
        return glyphs.added if fp.kind(cell) == "added" else glyphs.empty
    if names is None:
        return str(len(who))
    return "".join(names[i] for i in who)


def _cell_style(fp: Footprint, cell, paint: _Paint) -> str | None:
    who = fp.landing.get(cell, ())
    kind = fp.kind(cell)
    if kind == "crop":  # computed then dropped: the colour only in the letters
        return paint.fg(input_colour(who[0], fp.input_size)) if len(who) == 1 else paint.fg(240)
    if not who:
        return f"1;{paint.fg(ADDED_COLOUR)}" if kind == "added" else paint.fg(MUTED_COLOUR)
    if len(who) == 1:
        return paint.block(input_colour(who[0], fp.input_size))
    return paint.block(GREYS[min(len(who), 5) - 2])


def _slice_lines(fp: Footprint, depth_u: int, names, width: int, glyphs: Glyphs, paint: _Paint) -> list[str]:
    """One 2-D slice of the full grid, the output framed."""
    _, rows, cols = fp.axes
    field_width = width + 2
    framed = fp.axes[0].kind(depth_u) != "crop"
    c0, c1 = cols.keep_start - cols.start, cols.keep_stop - cols.start
    has_rows = fp.ndim > 1

    def label(axis: Axis, u: int) -> str:
        index = axis.index(u)
        if index is None:
            return ""
        return f"{index}+" if axis.kind(u) == "added" else str(index)

    def label_style(axis: Axis, u: int) -> str:
        return paint.fg(ADDED_COLOUR) if axis.kind(u) == "added" else paint.fg(MUTED_COLOUR)

    row_labels = {u: label(rows, u) if has_rows else "" for u in range(rows.start, rows.stop)}
    margin = max(len(t) for t in row_labels.values()) + 2

    lines = []
    header = " " * margin
    for u in range(cols.start, cols.stop):
        header += " " + paint(label(cols, u).center(field_width), label_style(cols, u))
    lines.append(header.rstrip())

    def border(left: str, right: str) -> str:
        text = " " * margin
        for j in range(cols.size + 1):
            if j == c0:
                text += left
            elif j == c1:
                text += right
            else:
                text += glyphs.h if c0 < j < c1 else " "
            if j < cols.size:
                text += (glyphs.h if c0 <= j < c1 else " ") * field_width
        return paint(text.rstrip(), "1")

    for u_row in range(rows.start, rows.stop):
        kept_row = framed and rows.kind(u_row) != "crop"
        if kept_row and u_row == rows.keep_start:
            lines.append(border(glyphs.tl, glyphs.tr))
        text = paint(row_labels[u_row].rjust(margin - 2), label_style(rows, u_row)) + "  "
        previous = None
        for j, u_col in enumerate(range(cols.start, cols.stop)):
            cell = (depth_u, u_row, u_col)
            style = _cell_style(fp, cell, paint)
            if kept_row and j in (c0, c1):
                gap = paint(glyphs.v, "1")
            elif style == previous and style and "48;5" in style:
                # the same input(s) on both sides: one patch, as in the classic diagrams
                gap = paint(" ", style)
            else:
                gap = " "
            body = _content(fp, cell, names, glyphs).center(field_width)
            text += gap + paint(body, style)
            previous = style
        text += paint(glyphs.v, "1") if kept_row and c1 == cols.size else ""
        lines.append(text.rstrip())
        if kept_row and u_row == rows.keep_stop - 1:
            lines.append(border(glyphs.bl, glyphs.br))
    return lines


def _input_lines(fp: Footprint, names: list[str], paint: _Paint) -> list[str]:
    """The input grid, each cell its name on its colour."""
    depth, height, width = fp.input_size
    lines = []
    for z in range(depth):
        if depth > 1:
            lines.append(f"  depth {z}:")
        for r in range(height):
            cells = []
            for c in range(width):
                flat = (z * height + r) * width + c
                cells.append(paint(f" {names[flat]} ", paint.block(input_colour(flat, fp.input_size))))
            lines.append(("    " + " ".join(cells)).rstrip())
    return lines


def picture_too_large(layer: Layer, limit_side: int = MAX_TEXT_SIDE, limit_cells: int = MAX_TEXT_CELLS) -> bool:
    sizes = drawn_size(layer)
    return max(sizes) > limit_side or math.prod(sizes) > limit_cells


def choose_cells(fp: Footprint, cells: str = "auto") -> list[str] | None:
    """Names per input cell when the grid shows names, None when it shows counts."""
    names = cell_names(fp.inputs)
    if cells == "count" or names is None:
        return None
    if cells == "names":
        return names
    return names if fp.most <= MAX_NAMES_PER_CELL else None


def render_grid(layer: Layer, *, color: bool = False, cells: str = "auto", ascii_only: bool = False) -> str:
    """The full output grid as text: where each input cell's kernel lands.

    Parameters
    ----------
    layer : Layer
    color : bool
        ANSI colours: each input cell's footprint on its own colour.
    cells : {"auto", "names", "count"}
        What an output cell shows: the names of the input cells that land on it,
        or how many; "auto" shows names while they stay short.
    ascii_only : bool
        Draw with ASCII only (for terminals without Unicode).
    """
    glyphs = ASCII if ascii_only else UNICODE
    paint = _Paint(color)
    fp = footprint(layer)
    names = choose_cells(fp, cells)
    legend_names = cell_names(fp.inputs)
    width = max(len(_content(fp, cell, names, glyphs)) for cell in _all_cells(fp))
    lines = []
    if legend_names is not None:
        order = "row by row" if layer.ndim > 1 else "left to right"
        lines.append(f"Input cells, named {order}:")
        lines.extend(_input_lines(fp, legend_names, paint))
        lines.append("")
    full = format_size(drawn_size(layer))
    lines.append(f"Where each input cell's kernel lands, on the full output grid ({full}) before cropping.")
    shows = "lists the input cells that land on it" if names is not None else "shows how many input cells land on it"
    lines.append(f"The frame is the output ({format_size(layer.output_size)}); each cell {shows}.")
    depth = fp.axes[0]
    for u in range(depth.start, depth.stop):
        if fp.ndim == 3:
            kind = depth.kind(u)
            note = {
                "crop": "cropped by padding",
                "added": f"output depth {depth.index(u)}, added by output_padding",
                "out": f"output depth {depth.index(u)}",
            }[kind]
            lines.append("")
            lines.append(f"depth {u} of the full grid ({note}):")
        lines.extend(_slice_lines(fp, u, names, width, glyphs, paint))
    legend = _legend(layer, fp, names, glyphs, paint)
    if legend:
        lines.append("")
        lines.extend(legend)
    return "\n".join(lines)


def _all_cells(fp: Footprint):
    return itertools.product(*(range(a.start, a.stop) for a in fp.axes))


def _legend(layer: Layer, fp: Footprint, names, glyphs: Glyphs, paint: _Paint) -> list[str]:
    lines = []
    kinds = {fp.kind(cell) for cell in _all_cells(fp)}
    empty_kept = any(
        not fp.landing.get(cell) and fp.kind(cell) == "out" for cell in _all_cells(fp)
    )
    if empty_kept:
        lines.append(f"  {paint(glyphs.empty, paint.fg(MUTED_COLOUR))}  no input cell lands here: the value is 0 (plus the bias)")
    if "crop" in kinds:
        pairs = list(zip(layer.pad_begin, layer.pad_end))
        if len(set(pairs)) == 1:
            crops = f"{pairs[0][0]} at the start and {pairs[0][1]} at the end of each dim"
        else:
            crops = ", ".join(
                f"{name} {b} at the start and {e} at the end"
                for name, (b, e) in zip(DIM_NAMES[layer.ndim], pairs)
            )
        lines.append(f"  outside the frame: computed, then cropped by padding ({crops})")
    if "added" in kinds:
        added = ", ".join(
            f"{name} +{a}" for name, a in zip(DIM_NAMES[layer.ndim], layer.added) if a
        )
        lines.append(
            f"  {paint(glyphs.added, f'1;{paint.fg(ADDED_COLOUR)}')}  added at the end by output_padding "
            f"({added}); labels with + mark those rows and columns"
        )
    if layer.same_mode and any(layer.output_padding):
        lines.append("  (with 'same' padding, output_padding only moves the crop: the size stays)")
    if lines:
        lines.insert(0, "Legend:")
    return lines


# --------------------------------------------------------------------------- #
# values computed by the engine
# --------------------------------------------------------------------------- #
def default_values(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """Input of ones and the kernel 1, 2, ..., prod(kernel) row by row."""
    x = np.ones(layer.input_size, dtype=np.int64)
    w = np.arange(1, math.prod(layer.kernel_size) + 1, dtype=np.int64).reshape(layer.kernel_size)
    return x, w


def compute(layer: Layer, x: np.ndarray, w: np.ndarray, backend: str | None = None) -> np.ndarray:
    """The engine's output for one input channel and one output channel (spatial dims only)."""
    import tconv

    function = getattr(tconv, layer.fname)
    out = function(np.asarray(x)[None, None], np.asarray(w)[None, None], backend=backend, **layer.api_kwargs)
    return out[0, 0]


def _matrix_lines(array: np.ndarray) -> list[str]:
    """Right-aligned rows; 3-D arrays as one block per depth."""
    array = np.asarray(array, dtype=np.float64)
    integral = np.all(np.isfinite(array)) and np.all(array == np.round(array))
    text = np.vectorize(lambda v: str(int(v)) if integral else f"{v:.4g}")(array) if array.size else array
    width = max((len(t) for t in np.ravel(text)), default=1)
    slices = text.reshape((-1,) + text.shape[-2:]) if text.ndim >= 2 else text.reshape(1, 1, -1)
    lines = []
    for z, block in enumerate(slices):
        if text.ndim == 3:
            lines.append(f"depth {z}:")
        for row in block:
            lines.append(" ".join(t.rjust(width) for t in row))
    return lines


def side_by_side(blocks: list[tuple[str, list[str]]], max_width: int, gap: int = 5) -> list[str]:
    """Titled blocks of lines next to each other, or one under the other when too wide."""
    widths = [max([len(title)] + [len(line) for line in lines]) for title, lines in blocks]
    if sum(widths) + gap * (len(blocks) - 1) + 2 > max_width:
        out = []
        for title, lines in blocks:
            out.append(f"  {title}")
            out.extend(f"  {line}" for line in lines)
        return out
    height = max(len(lines) for _, lines in blocks)
    rows = []
    for r in range(-1, height):
        parts = []
        for (title, lines), w in zip(blocks, widths):
            text = title if r < 0 else (lines[r] if r < len(lines) else "")
            parts.append(text.ljust(w))
        rows.append(("  " + (" " * gap).join(parts)).rstrip())
    return rows


def render_values(layer: Layer, x: np.ndarray, w: np.ndarray, *, backend: str | None = None,
                  max_width: int = 100) -> str:
    """Input, kernel and the output the engine computes for them, side by side."""
    from .registry import get_backend

    used = backend or get_backend()
    out = compute(layer, x, w, backend=used)
    lines = [f"Values, computed by tconv.{layer.fname} on the {used!r} backend (bias 0):"]
    lines.extend(side_by_side(
        [("input", _matrix_lines(x)), ("kernel", _matrix_lines(w)), ("output", _matrix_lines(out))],
        max_width,
    ))
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# which layer maps A to B
# --------------------------------------------------------------------------- #
def render_solutions(sources: Sequence[int], targets: Sequence[int], *, limit: int = 8) -> str:
    """Common (kernel, stride, padding, output_padding) choices per dim, each checked."""
    ndim = len(sources)
    names = DIM_NAMES.get(ndim, tuple(f"dim {d}" for d in range(ndim)))
    lines = []
    done: dict[tuple[int, int], str] = {}
    for dim, (a, b) in enumerate(zip(sources, targets)):
        if (a, b) in done:
            lines.append(f"{names[dim]}: same as {done[(a, b)]}")
            continue
        done[(a, b)] = names[dim]
        title = f"{names[dim]}: " if ndim > 1 else ""
        found = shape.solve(a, b, limit=limit)
        lines.append(
            f"{title}transposed convolutions that map {a} to {b} (dilation 1), simplest first:"
        )
        if not found:
            lines.append("  none with kernel <= 16 and stride <= 8 that keeps every input cell.")
            if b < a:
                lines.append("  A transposed convolution grows its input; to shrink, use a regular convolution.")
            continue
        rows = []
        for sol in found:
            k, s, p, o = sol
            got = shape.conv_transpose_output_size(a, k, s, p, o)[0]  # each answer checked
            check = f"({a} - 1) * {s} - {p} - {p} + ({k} - 1) + {o} + 1 = {got}"
            call = ", ".join(f"{key}={value}" for key, value in sol.as_kwargs().items())
            rows.append((repr(sol), check, call))
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines.append(f"  {'choice':<{widths[0]}}   {'check: the output-size formula':<{widths[1]}}   layer arguments")
        for sol_text, check, call in rows:
            lines.append(f"  {sol_text:<{widths[0]}}   {check:<{widths[1]}}   {call}")
        if b < a:
            lines.append("  (a transposed convolution grows its input; to shrink, a regular convolution is the usual choice)")
    lines.append("")
    lines.append("k = kernel_size, s = stride, p = padding, op = output_padding; "
                 "in Python: tconv.shape.solve(input_size, output_size)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# PNG
# --------------------------------------------------------------------------- #
PNG_CELL_INCHES = 0.4
PNG_DPI = 100
_MARGIN = 1  # cells of white around everything
_TITLE = 1  # the row of titles above the grids
_LEGEND = 2  # the rows of legend text below
_GAP = 2  # between the input and the output
_SLICE_GAP = 1  # between depth slices


@dataclass(frozen=True)
class PngLayout:
    """Where everything goes, in cell units (one cell = one square)."""

    width: int
    height: int
    input_origin: tuple[int, int]  # (x, y) of the input's top-left cell, depth slice 0
    output_origin: tuple[int, int]  # (x, y) of the full grid's top-left cell, depth slice 0
    input_step: int  # x distance between depth slices
    output_step: int


def png_layout(layer: Layer) -> PngLayout:
    """The image in cell units: margin, input slices, gap, full-grid slices, margin.

    Width: ``1 + D_in * (W_in + 1) - 1 + 2 + D_full * (W_full + 1) - 1 + 1`` cells;
    height: ``1 + 1 + max(H_in, H_full) + 2 + 1`` (margin, titles, grids, legend, margin).
    1-D problems have height-1 grids and 2-D problems one depth slice.
    """
    lift = 3 - layer.ndim
    d_in, h_in, w_in = (1,) * lift + layer.input_size
    d_out, h_out, w_out = (1,) * lift + drawn_size(layer)
    input_span = d_in * (w_in + _SLICE_GAP) - _SLICE_GAP
    output_span = d_out * (w_out + _SLICE_GAP) - _SLICE_GAP
    width = _MARGIN + input_span + _GAP + output_span + _MARGIN
    height = _MARGIN + _TITLE + max(h_in, h_out) + _LEGEND + _MARGIN
    top = _MARGIN + _TITLE
    return PngLayout(
        width=width, height=height,
        input_origin=(_MARGIN, top),
        output_origin=(_MARGIN + input_span + _GAP, top),
        input_step=w_in + _SLICE_GAP, output_step=w_out + _SLICE_GAP,
    )


def _xterm_rgb(code: int) -> tuple[float, float, float]:
    """RGB in 0..1 of an xterm-256 colour (the 6x6x6 cube and the grey ramp)."""
    if code >= 232:
        level = (8 + 10 * (code - 232)) / 255
        return (level, level, level)
    code -= 16
    steps = (0, 95, 135, 175, 215, 255)
    return tuple(steps[c] / 255 for c in (code // 36, (code // 6) % 6, code % 6))


def input_rgb(flat: int, input_size: tuple[int, int, int]) -> tuple[float, float, float]:
    """The colour of input cell ``flat`` (row by row), in the PNG as in the terminal."""
    return _xterm_rgb(input_colour(flat, input_size))


ADDED_RGB = _xterm_rgb(230)  # pale yellow: output_padding's cells that no input reaches
ADDED_EDGE = _xterm_rgb(ADDED_COLOUR)  # gold outline: every cell output_padding adds
EMPTY_RGB = (1.0, 1.0, 1.0)


def _blend(flats: list[int], input_size: tuple[int, int, int]) -> tuple[float, float, float]:
    """Mean of the colours, darker the more inputs overlap (as overlapping washes)."""
    mean = np.mean([input_rgb(f, input_size) for f in flats], axis=0)
    return tuple(mean * max(0.6, 0.88 ** (len(flats) - 1)))  # floored: labels stay readable


def _ink(background) -> str:
    """Black text on light cells, white on dark ones."""
    r, g, b = background[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.45 else "white"


def draw_png(layer: Layer, path: str, *, cells: str = "auto") -> PngLayout:
    """Draw the picture as a PNG: input cells on the left, the full grid on the right.

    Each input cell has its colour; an output cell reached by one input has
    that input's colour, one reached by several a darker mix; cells cropped by
    padding are hatched and faded, output_padding's cells pale yellow, and a
    thick frame outlines the output. Cells are squares of
    ``PNG_CELL_INCHES`` at ``PNG_DPI`` (smaller for very large grids).

    Raises
    ------
    ImportError
        When matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional extra: imported here only
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    fp = footprint(layer)
    names = choose_cells(fp, cells)
    layout = png_layout(layer)
    cell_inches = PNG_CELL_INCHES
    if max(layout.width, layout.height) * cell_inches > 40:  # keep huge grids a sane size
        cell_inches = 40 / max(layout.width, layout.height)
    fig = Figure(figsize=(layout.width * cell_inches, layout.height * cell_inches), dpi=PNG_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, layout.width)
    ax.set_ylim(layout.height, 0)  # y grows downwards, as rows do
    ax.set_axis_off()
    cell_points = cell_inches * 72
    label_size = cell_points * 0.42
    show_labels = cell_points >= 12

    # input
    d_in, h_in, w_in = fp.input_size
    legend_names = cell_names(fp.inputs)
    x0, y0 = layout.input_origin
    for z in range(d_in):
        for r in range(h_in):
            for c in range(w_in):
                flat = (z * h_in + r) * w_in + c
                x, y = x0 + z * layout.input_step + c, y0 + r
                ax.add_patch(Rectangle((x, y), 1, 1, facecolor=input_rgb(flat, fp.input_size), edgecolor="white", linewidth=1.5))
                if show_labels and legend_names is not None:
                    ax.text(x + 0.5, y + 0.5, legend_names[flat], ha="center", va="center", fontsize=label_size)
    ax.text(x0, y0 - 0.3, f"input {format_size(layer.input_size)}", fontsize=cell_points * 0.45, va="bottom")

    # full grid
    depth, rows, cols = fp.axes
    x0, y0 = layout.output_origin
    for k, u_d in enumerate(range(depth.start, depth.stop)):
        left = x0 + k * layout.output_step
        for r, u_r in enumerate(range(rows.start, rows.stop)):
            for c, u_c in enumerate(range(cols.start, cols.stop)):
                cell = (u_d, u_r, u_c)
                who = fp.landing.get(cell, [])
                kind = fp.kind(cell)
                if who:
                    colour = input_rgb(who[0], fp.input_size) if len(who) == 1 else _blend(who, fp.input_size)
                else:
                    colour = ADDED_RGB if kind == "added" else EMPTY_RGB
                ax.add_patch(Rectangle((left + c, y0 + r), 1, 1, facecolor=colour, edgecolor="#bbbbbb", linewidth=0.8))
                if kind == "added":
                    inset = 0.08
                    ax.add_patch(Rectangle((left + c + inset, y0 + r + inset), 1 - 2 * inset, 1 - 2 * inset,
                                           fill=False, edgecolor=ADDED_EDGE, linewidth=max(1.0, cell_points / 14)))
                if kind == "crop":  # faded and hatched: computed, then thrown away
                    ax.add_patch(Rectangle((left + c, y0 + r), 1, 1, facecolor=(1, 1, 1, 0.55),
                                           edgecolor="#888888", hatch="///", linewidth=0))
                if show_labels:
                    text = _content(fp, cell, names, UNICODE)
                    if text != UNICODE.empty:
                        ax.text(left + c + 0.5, y0 + r + 0.5, text, ha="center", va="center",
                                fontsize=label_size if len(text) < 3 else label_size * 2.4 / len(text),
                                color="#555555" if kind == "crop" else _ink(colour))
        if depth.kind(u_d) != "crop":
            ax.add_patch(Rectangle(
                (left + _first_kept(cols), y0 + _first_kept(rows)),
                cols.keep_stop - cols.keep_start, rows.keep_stop - rows.keep_start,
                fill=False, edgecolor="black", linewidth=max(1.5, cell_points / 8),
            ))
        if fp.ndim == 3:
            note = "cropped" if depth.kind(u_d) == "crop" else f"out {depth.index(u_d)}"
            title = f"depth {u_d}: {note}"
            fits = (cols.size + _SLICE_GAP * 0.8) * cell_points / (0.62 * len(title))
            ax.text(left, y0 - 0.3, title, fontsize=min(cell_points * 0.4, fits), va="bottom")
    if fp.ndim < 3:
        ax.text(x0, y0 - 0.3, f"output {format_size(layer.output_size)} (framed)",
                fontsize=cell_points * 0.45, va="bottom")
    legend = [describe(layer).split(": ", 1)[1] + "."]
    if any(layer.pad_begin) or any(layer.pad_end):
        legend.append("Hatched: cropped by padding.")
    if any(layer.added):
        legend.append("Gold outline: added by output_padding.")
    font = cell_points * 0.3
    per_line = max(20, int(layout.width * cell_points / (font * 0.6)))
    text = "\n".join(textwrap.wrap(" ".join(legend), per_line)[:3])
    ax.text(_MARGIN, layout.height - _MARGIN - _LEGEND / 2, text,
            fontsize=font, va="center", color="#333333", linespacing=1.3)
    fig.savefig(path, dpi=PNG_DPI, facecolor="white")
    return layout


def _first_kept(axis: Axis) -> int:
    """Drawn position of the output's first cell along ``axis``."""
    return axis.keep_start - axis.start
