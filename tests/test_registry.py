"""The backend registry: listing, choosing (process, scope, call, environment),
errors that name the backend and list the available ones, thread counts.

A "spy" backend (``conftest.SpyBackend``: the numpy backend under another
name, counting its calls) shows which backend actually ran a call; it is
registered per test and the registry is rediscovered afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import tconv

X = np.ones((1, 1, 3))
W = np.ones((1, 1, 2))


def run(backend=None):
    return tconv.conv_transpose1d(X, W, backend=backend)


# --------------------------------------------------------------------------- #
# listing
# --------------------------------------------------------------------------- #
def test_list_backends_describes_the_core_backends():
    infos = tconv.list_backends()
    names = [info.name for info in infos]
    assert {"numpy", "blas"} <= set(names)
    assert len(names) == len(set(names))
    for info in infos:
        assert isinstance(info, tconv.BackendInfo)
        assert isinstance(info.available, bool)
        assert isinstance(info.reason, str) and isinstance(info.description, str)
        if not info.available:
            assert info.reason, f"{info.name} is unavailable without a reason"
    numpy_info = next(info for info in infos if info.name == "numpy")
    assert numpy_info.available and numpy_info.description


def test_blas_is_listed_available(require):
    require("blas")  # fails under CI when the compiled core did not build
    assert next(i for i in tconv.list_backends() if i.name == "blas").available


def test_unavailable_backend_is_listed_with_its_reason(broken_spy):
    info = next(i for i in tconv.list_backends() if i.name == "unicorn")
    assert not info.available and info.reason == "needs a unicorn"


# --------------------------------------------------------------------------- #
# choosing
# --------------------------------------------------------------------------- #
def test_set_backend_is_process_wide_and_none_restores_the_default(spy):
    default = tconv.get_backend()
    tconv.set_backend("spy")
    assert tconv.get_backend() == "spy"
    seen = []
    thread = threading.Thread(target=lambda: seen.append(tconv.get_backend()))
    thread.start()
    thread.join()
    assert seen == ["spy"]
    run()
    assert spy.calls == 1
    tconv.set_backend(None)
    assert tconv.get_backend() == default


def test_use_backend_is_scoped_and_nests(spy, backend_name):
    outside = tconv.get_backend()
    with tconv.use_backend("spy") as name:
        assert name == "spy" and tconv.get_backend() == "spy"
        run()
        with tconv.use_backend(backend_name):
            assert tconv.get_backend() == backend_name
            run()
        assert tconv.get_backend() == "spy"
    assert tconv.get_backend() == outside
    assert spy.calls == 1


def test_use_backend_restores_after_an_exception(spy):
    outside = tconv.get_backend()
    with pytest.raises(KeyError):
        with tconv.use_backend("spy"):
            raise KeyError("boom")
    assert tconv.get_backend() == outside


def test_use_backend_beats_set_backend_and_backend_argument_beats_both(spy):
    tconv.set_backend("numpy")
    with tconv.use_backend("spy"):
        assert tconv.get_backend() == "spy"
        run(backend="numpy")
        assert spy.calls == 0
    run(backend="spy")
    assert spy.calls == 1


def test_use_backend_is_per_thread(spy):
    """Two threads inside different scoped backends at once each run on their own."""
    barrier = threading.Barrier(2, timeout=10)
    seen, errors = {}, []

    def worker(name):
        try:
            with tconv.use_backend(name):
                barrier.wait()  # both scopes are open now
                seen[name] = [tconv.get_backend()]
                for _ in range(20):
                    run()
                    seen[name].append(tconv.get_backend())
                barrier.wait()
        except Exception as exc:  # surfaced below: a failing thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("spy", "numpy")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert set(seen["spy"]) == {"spy"} and set(seen["numpy"]) == {"numpy"}
    assert spy.calls == 20  # the numpy thread never ran on the spy


def test_scoped_backend_does_not_leak_into_new_threads(spy):
    with tconv.use_backend("spy"):
        seen = []
        thread = threading.Thread(target=lambda: seen.append(tconv.get_backend()))
        thread.start()
        thread.join()
    assert seen and seen[0] != "spy"


def test_core_backends_per_call_agree(require):
    require("blas")
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    w = np.random.default_rng(1).standard_normal((3, 2, 3, 3))
    a = tconv.conv_transpose2d(x, w, stride=2, backend="numpy")
    b = tconv.conv_transpose2d(x, w, stride=2, backend="blas")
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #
ENTRY_POINTS = {
    "set_backend": lambda name: tconv.set_backend(name),
    "use_backend": lambda name: tconv.use_backend(name).__enter__(),
    "backend=": lambda name: run(backend=name),
}


@pytest.mark.parametrize("how", list(ENTRY_POINTS))
def test_unknown_backend_is_a_backend_error_naming_it_and_the_available(restore_backend_choice, how):
    with pytest.raises(tconv.BackendError) as info:
        ENTRY_POINTS[how]("no-such-backend")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "no-such-backend" in message
    for available in (i.name for i in tconv.list_backends() if i.available):
        assert available in message
    assert tconv.get_backend() != "no-such-backend"


@pytest.mark.parametrize("how", list(ENTRY_POINTS))
def test_unavailable_backend_is_a_backend_error_saying_why(broken_spy, how):
    with pytest.raises(tconv.BackendError) as info:
        ENTRY_POINTS[how]("unicorn")
    message = str(info.value)
    assert "unicorn" in message and "needs a unicorn" in message and "numpy" in message


@pytest.mark.parametrize("bad", [3, ["numpy"]])
def test_a_non_string_backend_name_is_refused(restore_backend_choice, bad):
    with pytest.raises((tconv.BackendError, TypeError)):
        tconv.set_backend(bad)
    with pytest.raises((tconv.BackendError, TypeError)):
        run(backend=bad)


# --------------------------------------------------------------------------- #
# the environment, in a fresh interpreter
# --------------------------------------------------------------------------- #
PROBE = """
import numpy as np
try:
    import tconv
    name = tconv.get_backend()
    out = tconv.conv_transpose1d(np.ones((1, 1, 3)), np.ones((1, 1, 2)))
    print("OK", name, tconv.get_num_threads(), out.ravel().tolist())
except Exception as exc:
    print("ERROR", type(exc).__name__, isinstance(exc, ValueError), exc)
"""


def probe(**env_vars):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCONV_")}
    root = str(Path(tconv.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.update(env_vars)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["numpy", "blas"])
def test_tconv_backend_env_selects_the_default(require, name):
    require(name)
    assert probe(TCONV_BACKEND=name).split()[:2] == ["OK", name]


def test_tconv_backend_env_with_an_unknown_name_is_a_backend_error():
    line = probe(TCONV_BACKEND="no-such-backend")
    assert line.startswith("ERROR BackendError True"), line
    assert "no-such-backend" in line and "numpy" in line


def test_without_env_the_default_is_a_compiled_backend_when_there_is_one():
    name = probe().split()[1]
    available = {i.name for i in tconv.list_backends() if i.available}
    assert name in available and name != "cupy"
    if "blas" in available:
        assert name != "numpy", "the pure NumPy reference was chosen over the compiled core"


def test_tconv_num_threads_env():
    assert probe(TCONV_NUM_THREADS="3").split()[2] == "3"


# --------------------------------------------------------------------------- #
# threads
# --------------------------------------------------------------------------- #
def test_set_num_threads_sets_and_none_resets(restore_threads):
    default = tconv.get_num_threads()
    assert default >= 1
    tconv.set_num_threads(1)
    assert tconv.get_num_threads() == 1
    run()  # still computes
    tconv.set_num_threads(None)
    assert tconv.get_num_threads() == default


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_set_num_threads_refuses_non_positive_and_non_integers(restore_threads, bad):
    before = tconv.get_num_threads()
    with pytest.raises((ValueError, TypeError)) as info:
        tconv.set_num_threads(bad)
    assert str(bad) in str(info.value) or repr(bad) in str(info.value)
    assert tconv.get_num_threads() == before


def test_a_blas_thread_count_that_did_not_take_is_not_remembered():
    """OpenBLAS ignores a thread count set from a worker thread: tconv must not then
    skip setting it from the main thread (it once left BLAS threaded under OpenMP)."""
    import threading

    from threadpoolctl import threadpool_info

    from tconv import _threads

    _threads.set_blas_threads(2)
    worker = threading.Thread(target=_threads.set_blas_threads, args=(1,))
    worker.start()
    worker.join()
    _threads.set_blas_threads(1)
    blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert blas and all(lib["num_threads"] == 1 for lib in blas), blas
