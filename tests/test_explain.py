"""``tconv.explain`` and ``tconv.shape.solve`` against the definition.

The expected pictures below were written by hand from SPEC's definition
(input cell ``i`` and tap ``a`` land on ``u = i * stride + a * dilation`` of the
full grid; the output is ``pad_begin <= u < pad_begin + out``) and the
picture's documented layout: a cell is its content centred in ``width + 2``
columns, one column between cells holds the frame, row labels are output
indices (``+`` marks what output_padding adds).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import oracle
from tconv import explain, shape

# SPEC's worked examples
KERNEL = [[1, 2, 3], [2, 2, 1], [3, 2, 1]]


def transposed_size(i, k, s=1, p_begin=0, p_end=0, op=0, d=1):
    """SPEC's formula, written out here so the tests do not ask the code under test."""
    return (i - 1) * s - p_begin - p_end + d * (k - 1) + op + 1


# --------------------------------------------------------------------------- #
# the three worked examples: shapes, derivation, pictures
# --------------------------------------------------------------------------- #
EXAMPLE_1_PICTURE = """\
Input cells, named row by row:
     a   b
     c   d

Where each input cell's kernel lands, on the full output grid (4x4) before cropping.
The frame is the output (4x4); each cell lists the input cells that land on it.
      0      1      2      3
   ┌───────────────────────────┐
0  │  a      ab     ab     b   │
1  │  ac    abcd   abcd    bd  │
2  │  ac    abcd   abcd    bd  │
3  │  c      cd     cd     d   │
   └───────────────────────────┘"""

# 3x3 input through a 3x3 kernel at stride 1 is 5x5 in full; every cell counts
# the inputs within kernel reach (1,2,3,2,1 per dim, multiplied); padding 2
# keeps the centre only.
EXAMPLE_2_PICTURE = """\
Input cells, named row by row:
     a   b   c
     d   e   f
     g   h   i

Where each input cell's kernel lands, on the full output grid (5x5) before cropping.
The frame is the output (1x1); each cell shows how many input cells land on it.
             0
     1   2   3   2   1
     2   4   6   4   2
           ┌───┐
0    3   6 │ 9 │ 6   3
           └───┘
     2   4   6   4   2
     1   2   3   2   1

Legend:
  outside the frame: computed, then cropped by padding (2 at the start and 2 at the end of each dim)"""

# Stride 3 = kernel size: the kernel tiles 3x3 times without overlap, and
# output_padding 1 adds row 9 and column 9, which no input reaches.
EXAMPLE_3_PICTURE = """\
Input cells, named row by row:
     a   b   c
     d   e   f
     g   h   i

Where each input cell's kernel lands, on the full output grid (10x10) before cropping.
The frame is the output (10x10); each cell lists the input cells that land on it.
      0   1   2   3   4   5   6   7   8   9+
    ┌───────────────────────────────────────┐
 0  │ a   a   a   b   b   b   c   c   c   + │
 1  │ a   a   a   b   b   b   c   c   c   + │
 2  │ a   a   a   b   b   b   c   c   c   + │
 3  │ d   d   d   e   e   e   f   f   f   + │
 4  │ d   d   d   e   e   e   f   f   f   + │
 5  │ d   d   d   e   e   e   f   f   f   + │
 6  │ g   g   g   h   h   h   i   i   i   + │
 7  │ g   g   g   h   h   h   i   i   i   + │
 8  │ g   g   g   h   h   h   i   i   i   + │
9+  │ +   +   +   +   +   +   +   +   +   + │
    └───────────────────────────────────────┘

Legend:
  +  added at the end by output_padding (height +1, width +1); labels with + mark those rows and columns"""


def test_example_1_shape_and_picture():
    layer = explain.analyse((2, 2), (3, 3))
    assert layer.output_size == (4, 4)
    assert explain.render_grid(layer) == EXAMPLE_1_PICTURE


def test_example_2_shape_and_picture():
    layer = explain.analyse((3, 3), (3, 3), padding=2)
    assert layer.output_size == (1, 1)
    assert (layer.pad_begin, layer.pad_end) == ((2, 2), (2, 2))
    assert explain.render_grid(layer) == EXAMPLE_2_PICTURE


def test_example_3_shape_and_picture():
    layer = explain.analyse((3, 3), (3, 3), stride=3, output_padding=1)
    assert layer.output_size == (10, 10)
    assert explain.render_grid(layer) == EXAMPLE_3_PICTURE


def test_example_3_derivation_step_by_step():
    lines = explain.derivation(explain.analyse((3, 3), (3, 3), stride=3, output_padding=1))
    assert lines == [
        "Output size, per spatial dim:",
        "  out = (in - 1) * stride - pad_begin - pad_end + dilation * (kernel - 1) + output_padding + 1",
        "  height  (3 - 1) * 3 - 0 - 0 + 1 * (3 - 1) + 1 + 1",
        "        = 6 - 0 - 0 + 2 + 1 + 1",
        "        = 10",
        "  width   same numbers as height: 10",
        "Output shape: 10x10  (input (N, C_in, 3, 3) gives (N, C_out, 10, 10))",
    ]


def test_derivation_per_dim_with_different_numbers():
    layer = explain.analyse((3, 5), (2, 3), stride=(2, 1), padding=((0, 1), (1, 1)), dilation=(1, 2))
    text = "\n".join(explain.derivation(layer))
    assert "height  (3 - 1) * 2 - 0 - 1 + 1 * (2 - 1) + 0 + 1" in text
    assert "= 4 - 0 - 1 + 1 + 0 + 1" in text
    assert "width   (5 - 1) * 1 - 1 - 1 + 2 * (3 - 1) + 0 + 1" in text
    assert layer.output_size == (transposed_size(3, 2, 2, 0, 1), transposed_size(5, 3, 1, 1, 1, d=2)) == (5, 7)


def test_values_of_example_1_come_from_the_engine():
    layer = explain.analyse((2, 2), (3, 3))
    out = explain.compute(layer, np.array([[1, 2], [3, 4]]), np.array(KERNEL), backend="numpy")
    np.testing.assert_array_equal(out, [[1, 4, 7, 6], [5, 16, 22, 14], [9, 22, 16, 6], [9, 18, 11, 4]])


# --------------------------------------------------------------------------- #
# other pictures
# --------------------------------------------------------------------------- #
def test_one_dim_picture_marks_crop_and_output_padding():
    # in 4, k3, s2: full 9 cells; u = 2i + a. Padding 1 crops u=0 and u=8,
    # output_padding 1 keeps u=8 again as output index 7.
    layer = explain.analyse((4,), (3,), stride=2, padding=1, output_padding=1)
    assert layer.output_size == (8,)
    assert "\n".join([
        "         0    1    2    3    4    5    6    7+",
        "       ┌───────────────────────────────────────┐",
        "    a  │ a    ab   b    bc   c    cd   d    d  │",
        "       └───────────────────────────────────────┘",
    ]) in explain.render_grid(layer)


def test_three_dim_picture_has_one_slice_per_depth():
    # depth: in 2, k2, s2 -> full 4; padding 1 crops depth 0 and 3
    layer = explain.analyse((2, 2, 2), (2, 2, 2), stride=2, padding=1)
    text = explain.render_grid(layer)
    assert "depth 0 of the full grid (cropped by padding):" in text
    assert "depth 1 of the full grid (output depth 0):" in text
    assert "depth 2 of the full grid (output depth 1):" in text
    assert "depth 3 of the full grid (cropped by padding):" in text
    assert text.count("┌") == 2  # only the kept slices are framed


def test_counts_or_names_on_request():
    layer = explain.analyse((2, 2), (3, 3))
    counts = explain.render_grid(layer, cells="count")
    assert "│  1     2     2     1   │" not in counts  # width follows the content
    assert "0  │ 1   2   2   1 │" in counts
    assert "1  │ 2   4   4   2 │" in counts


def test_colour_only_when_asked_and_ascii_fallback():
    layer = explain.analyse((3, 3), (3, 3), stride=2, padding=1, output_padding=1)
    assert "\x1b[" not in explain.render_grid(layer, color=False)
    coloured = explain.render_grid(layer, color=True)
    assert "\x1b[38;5;16;48;5;" in coloured  # input colours as backgrounds
    plain = explain.render_grid(layer, ascii_only=True)
    assert plain.isascii()
    assert "+---" in plain and "|" in plain


@pytest.mark.parametrize(
    "inp, kernel, stride, pads, op, dilation",
    [
        ((3, 3), (3, 3), (1, 1), ((2, 2), (2, 2)), (0, 0), (1, 1)),
        ((3, 4), (3, 2), (2, 3), ((1, 0), (0, 2)), (1, 2), (1, 1)),
        ((2, 3), (2, 3), (1, 2), ((0, 1), (1, 1)), (1, 1), (2, 2)),
        ((5,), (4,), (3,), ((1, 2),), (2,), (1,)),
        ((2, 2, 3), (2, 1, 3), (2, 1, 2), ((1, 0), (0, 0), (1, 1)), (0, 0, 1), (1, 1, 1)),
    ],
)
def test_framed_counts_equal_the_definition(inp, kernel, stride, pads, op, dilation):
    """Ones through ones: every output value counts the inputs that land there."""
    layer = explain.analyse(inp, kernel, stride=stride, padding=pads, output_padding=op, dilation=dilation)
    fp = explain.footprint(layer)
    begin = tuple(p[0] for p in pads)
    end = tuple(p[1] for p in pads)
    expected = oracle.conv_transpose_loops(
        np.ones((1, 1, *inp)), np.ones((1, 1, *kernel)), None, stride, begin, end, op, dilation, 1
    )[0, 0]
    lift = 3 - len(inp)
    for index in itertools.product(*(range(n) for n in expected.shape)):
        u = (0,) * lift + tuple(o + b for o, b in zip(index, begin))
        assert fp.kind(u) != "crop"
        assert len(fp.landing.get(u, ())) == expected[index]


def test_same_padding_story():
    layer = explain.analyse((3,), (3,), stride=2, padding="same")
    assert (layer.pad_begin, layer.pad_end, layer.output_size) == ((0,), (1,), (6,))
    text = "\n".join(explain.derivation(layer))
    assert "length: full = 7, out = 6, crop = 7 + 0 - 6 = 1 -> pad_begin 0, pad_end 1" in text


def test_output_size_story():
    layer = explain.analyse((7,), (3,), stride=2, padding=1, output_size=(14,))
    assert layer.output_padding == (1,)
    assert "length: reachable 13..14, so 14 needs output_padding 1" in "\n".join(explain.derivation(layer))


# --------------------------------------------------------------------------- #
# errors are the API's
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=2, output_padding=2),
        dict(stride=0),
        dict(padding=-1),
        dict(padding=3),
        dict(stride=2, output_size=(9, 9)),
        dict(padding="middle"),
        dict(dilation=(1, 2, 3)),
    ],
)
def test_errors_are_the_apis_word_for_word(kwargs):
    import tconv

    with pytest.raises((ValueError, TypeError)) as api:
        tconv.conv_transpose2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), **kwargs)
    with pytest.raises(type(api.value)) as ours:
        explain.analyse((3, 3), (3, 3), **kwargs)
    assert str(ours.value) == str(api.value)
    assert explain.why(str(ours.value))


def test_why_output_padding_names_the_stride():
    assert "stride" in explain.why("conv_transpose2d: output_padding must be smaller than stride or dilation, got")


# --------------------------------------------------------------------------- #
# PNG
# --------------------------------------------------------------------------- #
def _png(tmp_path, layer):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path = tmp_path / "picture.png"
    explain.draw_png(layer, str(path))
    return matplotlib.image.imread(str(path))[..., :3]


def test_png_proportions_and_colours(tmp_path):
    layer = explain.analyse((3, 3), (3, 3), stride=3, output_padding=1)
    pixels = _png(tmp_path, layer)
    # documented layout, in cells: margin 1, input 3, gap 2, full grid 10, margin 1
    # wide; margin 1, titles 1, grid 10, legend 2, margin 1 high; 0.4 inch at 100 dpi.
    cell = 40
    assert pixels.shape[:2] == (15 * cell, 17 * cell)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # not blank

    def colour_at(x_cells, y_cells):
        return np.round(pixels[int(y_cells * cell), int(x_cells * cell)] * 255)

    # input cell a, top-left, x 1..2, y 2..3: xterm colour 210 = (255, 135, 135)
    np.testing.assert_allclose(colour_at(1.25, 2.25), (255, 135, 135), atol=2)
    # output cell (0, 0), reached by a alone, at x 6..7
    np.testing.assert_allclose(colour_at(6.3, 2.3), (255, 135, 135), atol=2)
    # output cell (4, 4), reached by e alone (xterm 176 = (215, 135, 215))
    np.testing.assert_allclose(colour_at(10.3, 6.3), (215, 135, 215), atol=2)
    # output cell (9, 0), added by output_padding, empty: pale yellow xterm 230 = (255, 255, 215)
    np.testing.assert_allclose(colour_at(6.25, 11.75), (255, 255, 215), atol=2)


def test_png_of_a_tall_problem_is_tall(tmp_path):
    layer = explain.analyse((6, 1), (3, 3))  # full grid 8x3
    pixels = _png(tmp_path, layer)
    # wide: 1 + 1 + 2 + 3 + 1 = 8 cells; high: 1 + 1 + 8 + 2 + 1 = 13 cells
    assert pixels.shape[:2] == (13 * 40, 8 * 40)


# --------------------------------------------------------------------------- #
# shape.solve
# --------------------------------------------------------------------------- #
def test_solve_simplest_first_for_7_to_14():
    assert [tuple(s) for s in shape.solve(7, 14)[:3]] == [(2, 2, 0, 0), (4, 2, 1, 0), (3, 2, 1, 1)]
    assert repr(shape.solve(7, 14)[:3]) == "[k2 s2, k4 s2 p1, k3 s2 p1 op1]"


@pytest.mark.parametrize("a, b", [(7, 14), (1, 4), (4, 8), (3, 10), (5, 5), (16, 31), (2, 7)])
def test_every_solution_is_checked_by_the_formula(a, b):
    found = shape.solve(a, b, limit=None)
    assert found, (a, b)
    assert len(set(found)) == len(found)
    for kernel, stride, padding, output_padding in found:
        assert transposed_size(a, kernel, stride, padding, padding, output_padding) == b
        assert output_padding < stride  # PyTorch's rule at dilation 1
        assert padding < kernel and kernel >= stride


def test_solve_finds_the_dcgan_layers():
    assert tuple(shape.solve(1, 4)[0]) == (4, 1, 0, 0)  # 1x1 latent -> 4x4
    assert (4, 2, 1, 0) in shape.solve(4, 8)  # each later block doubles


def test_solve_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        shape.solve(0, 4)
    with pytest.raises(TypeError):
        shape.solve(2.5, 4)
