"""Malformed input never crashes and always gets a clear error (issue 7).

1. A table of bad arguments against every public function, in process: each
   must raise the stated exception type with a message naming the argument.
2. The fuzzer (``tests/fuzz_malformed.py``) in worker subprocesses, so that a
   segfault or abort is seen and counted rather than killing pytest: CI runs
   ``CI_CASES`` cases (seed ``TCONV_FUZZ_SEED``, default 0); ``-m slow`` runs
   ``TCONV_FUZZ_CASES`` (default 20000) with a fresh seed, printed for
   reproduction. Zero crashes and zero failures are required.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tconv

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_malformed  # noqa: E402

sys.path.pop(0)

CI_CASES = int(os.environ.get("TCONV_FUZZ_CI_CASES", "2000"))
SLOW_CASES = int(os.environ.get("TCONV_FUZZ_CASES", "20000"))


# --------------------------------------------------------------------------- #
# 1. the table
# --------------------------------------------------------------------------- #
def _valid_call(name: str):
    """(function, positional args, keyword args) of a valid call of public function ``name``."""
    nd = int(re.search(r"(\d)d", name).group(1))
    transposed = name.startswith("conv_transpose")
    x = np.ones((2, 4, *(5,) * nd))
    w = np.ones((4, 2, *(3,) * nd)) if transposed else np.ones((2, 4, *(3,) * nd))
    fn = getattr(tconv, name)
    if name.endswith("_backward"):
        forward = getattr(tconv, name[: -len("_backward")])
        dy = np.ones(forward(x, w).shape)
        return fn, (dy, x, w), {}
    return fn, (x, w), {}


FUNCTIONS = [f"{op}{d}d{suffix}" for op in ("conv_transpose", "conv") for d in (1, 2, 3)
             for suffix in ("", "_backward")]

# (what, how to break the call, exception, the argument the message must name)
BAD = [
    ("x is an object array", lambda a, k: (_swap(a, "x", a[_i(a, "x")].astype(object)), k), TypeError, "x"),
    ("x is complex", lambda a, k: (_swap(a, "x", a[_i(a, "x")] + 0j), k), TypeError, "x"),
    ("x is a string", lambda a, k: (_swap(a, "x", "abc"), k), TypeError, "x"),
    ("x is None", lambda a, k: (_swap(a, "x", None), k), TypeError, "x"),
    ("x is a scalar", lambda a, k: (_swap(a, "x", 1.0), k), ValueError, "x"),
    ("x has an extra axis", lambda a, k: (_swap(a, "x", a[_i(a, "x")][None]), k), ValueError, "x"),
    ("x has zero spatial size", lambda a, k: (_swap(a, "x", a[_i(a, "x")][..., :0]), k), ValueError, "x"),
    ("x is a ragged list", lambda a, k: (_swap(a, "x", [[1.0], [1.0, 2.0]]), k), TypeError, "x"),
    ("weight is an object array", lambda a, k: (_swap(a, "weight", a[_i(a, "weight")].astype(object)), k),
     TypeError, "weight"),
    ("weight has a missing axis", lambda a, k: (_swap(a, "weight", a[_i(a, "weight")][0]), k), ValueError,
     "weight"),
    ("stride 0", lambda a, k: (a, {**k, "stride": 0}), ValueError, "stride"),
    ("stride -1", lambda a, k: (a, {**k, "stride": -1}), ValueError, "stride"),
    ("stride True", lambda a, k: (a, {**k, "stride": True}), TypeError, "stride"),
    ("stride 1.0", lambda a, k: (a, {**k, "stride": 1.0}), TypeError, "stride"),
    ("stride '2'", lambda a, k: (a, {**k, "stride": "2"}), TypeError, "stride"),
    ("stride 2**64", lambda a, k: (a, {**k, "stride": 2**64}), ValueError, "stride"),
    ("dilation 0", lambda a, k: (a, {**k, "dilation": 0}), ValueError, "dilation"),
    ("dilation None", lambda a, k: (a, {**k, "dilation": None}), TypeError, "dilation"),
    ("padding -1", lambda a, k: (a, {**k, "padding": -1}), ValueError, "padding"),
    ("padding 'bogus'", lambda a, k: (a, {**k, "padding": "bogus"}), ValueError, "padding"),
    ("padding nan", lambda a, k: (a, {**k, "padding": float("nan")}), TypeError, "padding"),
    ("groups 0", lambda a, k: (a, {**k, "groups": 0}), ValueError, "groups"),
    ("groups 3 (divides nothing)", lambda a, k: (a, {**k, "groups": 3}), ValueError, "groups"),
    ("groups False", lambda a, k: (a, {**k, "groups": False}), TypeError, "groups"),
    ("unknown backend", lambda a, k: (a, {**k, "backend": "no-such-backend"}), ValueError, "backend"),
]


def _i(args, name):
    """Position of ``name`` in the positional arguments (backward calls start with grad_output)."""
    return {"x": 0, "weight": 1}[name] + (1 if len(args) == 3 else 0)


def _swap(args, name, value):
    args = list(args)
    args[_i(args, name)] = value
    return tuple(args)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("what, breaker, error, argument", BAD, ids=[b[0] for b in BAD])
def test_bad_argument_raises_and_names_it(function, what, breaker, error, argument):
    fn, args, kwargs = _valid_call(function)
    args, kwargs = breaker(args, kwargs)
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert fuzz_malformed.names_argument(message, [argument]), f"{what}: message does not name {argument}: {message!r}"
    assert function in message or "backend" in message, f"{what}: message does not name {function}: {message!r}"


@pytest.mark.parametrize("function", [f for f in FUNCTIONS if f.endswith("_backward")])
def test_backward_rejects_bad_needs_and_grad_output(function):
    fn, (dy, x, w), _ = _valid_call(function)
    with pytest.raises(ValueError, match="needs"):
        fn(dy, x, w, needs=("bogus",))
    with pytest.raises(TypeError, match="needs"):
        fn(dy, x, w, needs=5)
    with pytest.raises(ValueError, match="grad_output"):
        fn(dy[..., :-1], x, w)


LAYERS = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Conv1d", "Conv2d", "Conv3d"]


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_reject_bad_hyperparameters(layer):
    cls = getattr(tconv, layer)
    for arg, value, error in [("in_channels", 0, ValueError), ("out_channels", -1, ValueError),
                              ("in_channels", 2.0, ValueError), ("groups", 3, ValueError),
                              ("kernel_size", 0, ValueError), ("dtype", np.int32, TypeError)]:
        kwargs = dict(in_channels=4, out_channels=2, kernel_size=3)
        kwargs[arg] = value
        with pytest.raises(error, match=arg):
            cls(**kwargs)


# --------------------------------------------------------------------------- #
# 2. the fuzzer, crashes counted in subprocesses
# --------------------------------------------------------------------------- #
def _run_fuzzer(cases: int, seed: int, capsys, budget_s: float | None = None):
    started = time.monotonic()
    summary = fuzz_malformed.supervise(cases, seed=seed)
    elapsed = time.monotonic() - started
    text = fuzz_malformed.format_summary(summary)
    with capsys.disabled():
        print("\n" + text)
    assert summary["ran"] == cases, f"only {summary['ran']} of {cases} cases ran\n{text}"
    assert not summary["crashes"], f"{len(summary['crashes'])} crashes (seed {seed})\n{text}"
    failed = {k: v for k, v in summary["counts"].items() if k.startswith("fail:")}
    assert not failed, (f"{sum(failed.values())} failures {failed}; reproduce one with "
                        f"`python tests/fuzz_malformed.py --seed {seed} --case N`\n{text}")
    if budget_s is not None:
        assert elapsed < budget_s, f"{cases} fuzz cases took {elapsed:.0f} s, over the CI budget of {budget_s} s"
    return summary


def test_fuzzer_sees_and_counts_a_crash():
    """A worker killed by a signal is one counted crash; the run goes on after it."""
    env = {**os.environ, "TCONV_FUZZ_SELFTEST_CRASH": "7"}
    summary = fuzz_malformed.supervise(20, seed=0, env=env)
    assert [(c["case"], c["how"]) for c in summary["crashes"]] == [(7, "signal 11")], summary["crashes"]
    assert summary["ran"] == 20  # 19 cases and the crash


def test_fuzz_malformed_inputs_bounded(capsys):
    _run_fuzzer(CI_CASES, int(os.environ.get("TCONV_FUZZ_SEED", "0")), capsys, budget_s=120)


@pytest.mark.slow
def test_fuzz_malformed_inputs_long(capsys):
    seed = int(os.environ.get("TCONV_FUZZ_SEED", str(int(time.time()) % 100000)))
    _run_fuzzer(SLOW_CASES, seed, capsys)
