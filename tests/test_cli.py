"""``python -m tconv info`` and ``python -m tconv explain``.

Most runs are in-process through ``tconv.cli.main`` (fast); a few go through
a real ``python -m tconv`` subprocess to prove the entry point and the exit
status. Expected numbers are worked out by hand from SPEC's formula and
worked examples.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tconv
from tconv import cli

REPO = Path(__file__).resolve().parents[1]


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(list(argv), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def run_process(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("TCONV_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "tconv", *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )


# --------------------------------------------------------------------------- #
# explain: SPEC's worked examples
# --------------------------------------------------------------------------- #
def test_example_1_values_through_the_engine():
    status, out, _ = run("explain", "--input", "2x2", "--kernel", "3x3",
                         "--input-values", "1 2; 3 4", "--kernel-values", "1 2 3; 2 2 1; 3 2 1",
                         "--backend", "numpy")
    assert status == 0
    assert "Output shape: 4x4" in out
    # SPEC's 4x4 result, right-aligned to the widest number (2 digits)
    for row in (" 1  4  7  6", " 5 16 22 14", " 9 22 16  6", " 9 18 11  4"):
        assert any(line.endswith(row) for line in out.splitlines()), row


def test_example_2_centre_is_17():
    status, out, _ = run("explain", "--input", "3x3", "--kernel", "3x3", "--padding", "2",
                         "--kernel-values", "1,2,3; 2,2,1; 3,2,1")
    assert status == 0
    assert "(3 - 1) * 1 - 2 - 2 + 1 * (3 - 1) + 0 + 1" in out
    assert "Output shape: 1x1" in out
    values = out[out.index("Values"):].splitlines()
    assert values[2].split()[-1] == "17"  # the output block's only number
    assert "0    3   6 │ 9 │ 6   3" in out  # the centre of the 5x5 full grid, framed


def test_example_3_derivation_and_picture():
    status, out, err = run("explain", "--input", "3x3", "--kernel", "3x3", "--stride", "3", "--output-padding", "1")
    assert (status, err) == (0, "")
    assert out.startswith(
        "conv_transpose2d: input 3x3, kernel 3x3, stride 3, padding 0, output_padding 1, dilation 1\n"
    )
    assert "  height  (3 - 1) * 3 - 0 - 0 + 1 * (3 - 1) + 1 + 1\n        = 6 - 0 - 0 + 2 + 1 + 1\n        = 10\n" in out
    assert "Output shape: 10x10" in out
    assert " 0  │ a   a   a   b   b   b   c   c   c   + │" in out
    assert "9+  │ +   +   +   +   +   +   +   +   +   + │" in out
    assert "\x1b[" not in out  # not a terminal: no colour


def test_colour_switches():
    argv = ("explain", "--input", "2x2", "--kernel", "2x2", "--stride", "2")
    assert "\x1b[" in run(*argv, "--color")[1]
    assert "\x1b[" not in run(*argv, "--color", "--no-color")[1]


def test_one_value_or_one_per_dim():
    status, out, _ = run("explain", "--input", "4", "--kernel", "3", "--stride", "2,1", "--padding", "0:1,1:0")
    assert status == 0
    # height: (4-1)*2 - 0 - 1 + 2 + 0 + 1 = 8; width: (4-1)*1 - 1 - 0 + 2 + 0 + 1 = 5
    assert "Output shape: 8x5" in out


def test_three_dims_and_same_padding():
    status, out, _ = run("explain", "--input", "2x2x2", "--kernel", "3", "--stride", "2", "--padding", "same")
    assert status == 0
    assert "Output shape: 4x4x4" in out  # "same": in * stride
    # full = (2-1)*2 + 3 = 5, crop 5 - 4 = 1, the odd cell at the end
    assert "depth: full = 5, out = 4, crop = 5 + 0 - 4 = 1 -> pad_begin 0, pad_end 1" in out
    assert out.count("of the full grid") == 5


def test_output_size_implies_output_padding():
    status, out, _ = run("explain", "--input", "7x7", "--kernel", "3", "--stride", "2", "--padding", "1",
                         "--output-size", "14")
    assert status == 0
    # smallest (7-1)*2 - 2 + 2 + 1 = 13; stride 2 reaches 13..14
    assert "height: reachable 13..14, so 14 needs output_padding 1" in out
    assert "Output shape: 14x14" in out


def test_values_default_to_ones_and_counting_kernel():
    status, out, _ = run("explain", "--input", "2", "--kernel", "3", "--stride", "2", "--values", "--backend", "numpy")
    assert status == 0
    # kernel 1 2 3 at 0 and at 2: 1 2 (3+1) 2 3
    assert out.rstrip().endswith("1 2 4 2 3")


def test_png(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path = tmp_path / "out.png"
    status, out, _ = run("explain", "--input", "2x2", "--kernel", "3", "--png", str(path))
    assert status == 0 and f"Wrote {path}" in out
    pixels = matplotlib.image.imread(str(path))
    # layout in cells: 1 + 2 + 2 + 4 + 1 wide, 1 + 1 + 4 + 2 + 1 high, 40 px each
    assert pixels.shape[:2] == (9 * 40, 10 * 40)
    assert pixels[..., :3].std() > 0.1  # not blank


def test_png_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.patches", "matplotlib.backends",
                 "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    status, out, err = run("explain", "--input", "2", "--kernel", "2", "--png", str(tmp_path / "x.png"))
    assert status == 1
    assert "pip install matplotlib" in err
    assert "Output shape: 3" in out  # the text is still there
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- #
# explain --from / --to
# --------------------------------------------------------------------------- #
ANSWER = re.compile(r"^  k(\d+) s(\d+)(?: p(\d+))?(?: op(\d+))?\s")


def answers(out: str) -> list[tuple[int, int, int, int]]:
    found = []
    for line in out.splitlines():
        m = ANSWER.match(line)
        if m:
            found.append(tuple(int(g or 0) for g in m.groups()))
    return found


def test_from_to_7_to_14_simplest_first():
    status, out, _ = run("explain", "--from", "7x7", "--to", "14x14")
    assert status == 0
    assert answers(out)[:3] == [(2, 2, 0, 0), (4, 2, 1, 0), (3, 2, 1, 1)]
    assert "width: same as height" in out


@pytest.mark.parametrize("source, target", [("7", "14"), ("3x5", "10x9"), ("1", "4"), ("16", "33")])
def test_from_to_answers_satisfy_the_formula(source, target):
    status, out, _ = run("explain", "--from", source, "--to", target, "--limit", "20")
    assert status == 0
    pairs = list(zip(map(int, source.split("x")), map(int, target.split("x"))))
    found = answers(out)
    assert found
    for k, s, p, op in found:
        # out = (in - 1) * stride - 2 * padding + (kernel - 1) + output_padding + 1, dilation 1
        assert any((a - 1) * s - 2 * p + (k - 1) + op + 1 == b for a, b in pairs)
        assert op < s


# --------------------------------------------------------------------------- #
# bad arguments: the API's message, exit status 2
# --------------------------------------------------------------------------- #
def api_message(**kwargs) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        tconv.conv_transpose2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), **kwargs)
    return str(info.value)


@pytest.mark.parametrize(
    "options, kwargs",
    [
        (["--stride", "2", "--output-padding", "2"], dict(stride=2, output_padding=2)),
        (["--stride", "0"], dict(stride=0)),
        (["--dilation", "0"], dict(dilation=0)),
        (["--padding", "-1"], dict(padding=-1)),
        (["--padding", "3"], dict(padding=3)),
        (["--stride", "2", "--output-size", "9"], dict(stride=2, output_size=(9, 9))),
        (["--stride", "1,2,3"], dict(stride=(1, 2, 3))),
    ],
)
def test_bad_arguments_give_the_api_message(options, kwargs):
    status, out, err = run("explain", "--input", "3x3", "--kernel", "3x3", *options)
    assert status == 2
    assert out == ""
    assert f"error: {api_message(**kwargs)}\n" in err
    assert "why: " in err


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "--input", "3", "--kernel", "3", "--stride", "two"],
        ["explain", "--input", "3", "--kernel", "3", "--padding", "bogus"],
        ["explain", "--input", "3x3", "--kernel", "3x3x3"],
        ["explain", "--kernel", "3"],
        ["explain", "--from", "7"],
        ["explain", "--input", "2x2", "--kernel", "2", "--input-values", "1 2 3"],
        ["explain", "--bogus"],
        ["nothing"],
        [],
    ],
)
def test_unreadable_arguments_exit_2(argv):
    status, out, err = run(*argv)
    assert status == 2
    assert err.startswith("error: ")


def test_subprocess_bad_output_padding():
    proc = run_process("explain", "--input", "3x3", "--kernel", "3x3", "--stride", "2", "--output-padding", "2")
    assert proc.returncode == 2
    assert api_message(stride=2, output_padding=2) in proc.stderr
    assert "stride" in proc.stderr[proc.stderr.index("why:"):]


def test_subprocess_unreachable_output_size():
    proc = run_process("explain", "--input", "3x3", "--kernel", "3x3", "--stride", "2", "--output-size", "9x9")
    assert proc.returncode == 2
    assert api_message(stride=2, output_size=(9, 9)) in proc.stderr
    assert "7..8" in proc.stderr  # (3-1)*2 + 3 = 7 with output_padding 0, 8 with 1


# --------------------------------------------------------------------------- #
# argument readers
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "text, expected",
    [
        ("1", 1), ("1,2", (1, 2)), ("0:1,1:0", ((0, 1), (1, 0))), ("1,0:1", ((1, 1), (0, 1))),
        ("same", "same"), ("SAME_LOWER", "same_lower"), ("same-lower", "same_lower"), ("valid", "valid"),
    ],
)
def test_parse_padding(text, expected):
    assert cli.parse_padding(text) == expected


def test_parse_sizes_and_values():
    assert cli.parse_sizes("4x4x4", "--input") == (4, 4, 4)
    assert cli.parse_sizes("5", "--input") == (5,)
    np.testing.assert_array_equal(cli.parse_values("1 2; 3 4", "v"), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(cli.parse_values("1 2 3", "v"), [1, 2, 3])
    assert cli.parse_values("1 2; 3 4 | 5 6; 7 8", "v").shape == (2, 2, 2)


# --------------------------------------------------------------------------- #
# info
# --------------------------------------------------------------------------- #
def test_info_lists_version_backends_blas_threads():
    status, out, _ = run("info")
    assert status == 0
    assert out.startswith(f"tconv {tconv.__version__}")
    for info in tconv.list_backends():
        assert re.search(rf"^\s+\*?\s*{re.escape(info.name)}\s+(available|unavailable)", out, re.M)
    assert "BLAS:" in out
    assert f"tconv threads: {tconv.get_num_threads()}" in out


def test_info_json():
    status, out, _ = run("info", "--json")
    assert status == 0
    report = json.loads(out)
    assert report["version"] == tconv.__version__
    assert [b["name"] for b in report["backends"]] == [b.name for b in tconv.list_backends()]
    assert report["num_threads"] == tconv.get_num_threads()
    assert all("num_threads" in lib for lib in report["blas"])


def test_info_reports_a_backends_threads_through_the_hook():
    from tconv import registry
    from tconv._numpy_backend import NumpyBackend

    class Threaded(NumpyBackend):
        name = "threaded-test"
        default_priority = None

        def thread_info(self):
            return "3 OpenMP threads, BLAS 1"

    registry.register_backend(Threaded())
    try:
        status, out, _ = run("info")
    finally:
        registry.reload_backends()
    assert status == 0
    assert "threads: 3 OpenMP threads, BLAS 1" in out


def test_info_subprocess():
    proc = run_process("info")
    assert proc.returncode == 0
    assert "numpy" in proc.stdout and "BLAS" in proc.stdout
