"""Backend registry: discovery through entry points, selection, thread budget.

Backends are found in the ``tconv.backends`` entry-point group, the core's
own ``blas`` and ``numpy`` included. A plugin that fails to load is listed
with its error as the reason, never raised at import. Asking for a backend
that is unknown or cannot run raises :class:`BackendError` with the list of
those that can: there is no silent fallback.

Which backend runs a call, first match wins:

1. the call's ``backend=`` argument;
2. the innermost ``with use_backend(name)`` of the current thread or task;
3. ``set_backend(name)``;
4. the ``TCONV_BACKEND`` environment variable;
5. the available backend with the highest ``default_priority``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Iterator

from .backend import Backend

__all__ = [
    "BackendError",
    "BackendInfo",
    "list_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "resolve_backend",
    "get_num_threads",
    "set_num_threads",
]

ENTRY_POINT_GROUP = "tconv.backends"

# What the core ships, used when tconv runs from a source tree that was never
# installed (so its entry points are not in any dist-info).
_BUILTIN_ENTRY_POINTS = {
    "blas": "tconv._blas_backend:BlasBackend",
    "numpy": "tconv._numpy_backend:NumpyBackend",
}


class BackendError(ValueError):
    """A backend was asked for that is unknown or cannot run here."""


@dataclass(frozen=True)
class BackendInfo:
    """What ``list_backends()`` reports for one backend."""

    name: str
    available: bool
    reason: str
    description: str


@dataclass
class _Entry:
    name: str
    backend: Backend | None
    load_error: str = ""
    _info: BackendInfo | None = None

    def info(self) -> BackendInfo:
        """What the backend says of itself; asked once per process (it cannot change)."""
        if self._info is None:
            self._info = self._ask()
        return self._info

    def _ask(self) -> BackendInfo:
        if self.backend is None:
            return BackendInfo(self.name, False, self.load_error, "")
        try:
            available, reason = self.backend.availability()
        except Exception as exc:  # a plugin's own check must not break the listing
            available, reason = False, f"availability check failed: {exc!r}"
        return BackendInfo(self.name, bool(available), reason, self.backend.description)


_lock = threading.Lock()
_entries: dict[str, _Entry] | None = None
#: name -> backend for the names ``_checked`` has passed since the entries last
#: changed: a call's backend is then one dict lookup. Replaced (never cleared in
#: place) whenever the entries change, so a check racing with the change can only
#: fill a map no longer in use.
_ready: dict[str, Backend] = {}
_process_choice: str | None = None
_scoped_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tconv_backend", default=None
)


def _load(name: str, loader) -> _Entry:
    try:
        obj = loader()
        backend = obj if isinstance(obj, Backend) else obj()  # a class or a factory
        if not isinstance(backend, Backend):
            raise TypeError(f"entry point gave {type(backend).__name__}, not a tconv Backend")
        return _Entry(name, backend)
    except Exception as exc:  # a broken plugin is reported, never raised here
        return _Entry(name, None, f"failed to load: {type(exc).__name__}: {exc}")


def _discover() -> dict[str, _Entry]:
    found: dict[str, _Entry] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = _load(ep.name, ep.load)
    for name, target in _BUILTIN_ENTRY_POINTS.items():
        if name not in found:
            module, attr = target.split(":")

            def loader(module=module, attr=attr):
                import importlib

                return getattr(importlib.import_module(module), attr)

            found[name] = _load(name, loader)
    return dict(sorted(found.items()))


def _registry() -> dict[str, _Entry]:
    global _entries
    if _entries is None:
        with _lock:
            if _entries is None:
                _entries = _discover()
    return _entries


def reload_backends() -> None:
    """Forget what was discovered; the next call scans the entry points again."""
    global _entries, _default_cache, _ready
    with _lock:
        _entries = None
        _default_cache = None
        _ready = {}


def register_backend(backend: Backend, *, name: str | None = None) -> None:
    """Register a backend object in this process (tests, experiments).

    Installed plugins should use the ``tconv.backends`` entry-point group instead.
    """
    global _default_cache, _ready
    entries = _registry()
    with _lock:
        entries[name or backend.name] = _Entry(name or backend.name, backend)
        _default_cache = None
        _ready = {}


def list_backends() -> list[BackendInfo]:
    """Every backend found, with whether it can run here and why not.

    Returns
    -------
    list of BackendInfo
        ``(name, available, reason, description)``, sorted by name.
    """
    return [entry.info() for entry in _registry().values()]


def _available_names() -> list[str]:
    return [info.name for info in list_backends() if info.available]


def _checked(name: str, source: str) -> Backend:
    if not isinstance(name, str):
        raise BackendError(f"{source} must be a backend name (str), got {name!r}")
    entry = _registry().get(name)
    if entry is not None and entry.info().available:
        return entry.backend
    available = ", ".join(_available_names()) or "none"
    if entry is None:
        raise BackendError(
            f"unknown backend {name!r} (from {source}); available backends: {available}"
        )
    raise BackendError(
        f"backend {name!r} (from {source}) cannot run here: {entry.info().reason}; "
        f"available backends: {available}"
    )


# --------------------------------------------------------------------------- #
# environment variables, read on every call
# --------------------------------------------------------------------------- #
# ``os.environ.get`` encodes the key and decodes the value: about a microsecond,
# which a tiny convolution notices. What the variables decide is cached against
# their raw value (the token), read straight from ``os.environ``'s own store,
# which every change made through ``os.environ`` updates: the same view of the
# environment as ``os.environ.get`` (neither sees a bare ``os.putenv``). On a miss, the value is decoded from that
# same token, so a cached decision always belongs to its token.
_ENVIRON = os.environ
try:
    _ENV_STORE = os.environ._data  # type: ignore[attr-defined]
    _ENV_KEYS = {name: os.environ.encodekey(name)  # type: ignore[attr-defined]
                 for name in ("TCONV_BACKEND", "TCONV_NUM_THREADS")}
    _ENV_DECODE = os.environ.decodevalue  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - an unusual os.environ
    _ENV_STORE = None


def _env_token(name: str):
    """A cheap stand-in for ``os.environ.get(name)``: equal tokens, equal values."""
    if _ENV_STORE is not None and os.environ is _ENVIRON:
        return _ENV_STORE.get(_ENV_KEYS[name])
    return ("str", os.environ.get(name))  # os.environ was replaced (e.g. by a test): read it plainly


def _env_value(token) -> str:
    """``os.environ.get(name, "")`` for the value the token stands for."""
    if type(token) is tuple:
        return token[1] or ""
    return "" if token is None else _ENV_DECODE(token)


_default_cache: tuple | None = None  # (TCONV_BACKEND's token, name chosen)


def _default_name() -> str:
    global _default_cache
    token = _env_token("TCONV_BACKEND")
    cached = _default_cache
    if cached is not None and cached[0] == token:
        return cached[1]
    env = _env_value(token).strip()
    if env:
        _checked(env, "TCONV_BACKEND")
        chosen = env
    else:
        ranked = [
            (entry.backend.default_priority, entry.name)
            for entry in _registry().values()
            if entry.backend is not None and entry.backend.default_priority is not None
            and entry.info().available
        ]
        if not ranked:
            raise BackendError("no backend can run here; see tconv.list_backends()")
        chosen = max(ranked)[1]
    _default_cache = (token, chosen)
    return chosen


def get_backend() -> str:
    """Name of the backend in force for this thread (see the module docstring)."""
    scoped = _scoped_choice.get()
    if scoped is not None:
        return scoped
    if _process_choice is not None:
        return _process_choice
    return _default_name()


def set_backend(name: str | None) -> None:
    """Choose the backend for the whole process; ``None`` returns to the default.

    Raises
    ------
    BackendError
        If ``name`` is unknown or cannot run here.
    """
    global _process_choice
    if name is not None:
        _checked(name, "set_backend")
    _process_choice = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Use ``name`` inside the ``with`` block, in this thread (or async task) only.

    Examples
    --------
    >>> with use_backend("numpy"):
    ...     get_backend()
    'numpy'
    """
    _checked(name, "use_backend")
    token = _scoped_choice.set(name)
    try:
        yield name
    finally:
        _scoped_choice.reset(token)


def resolve_backend(name: str | None = None) -> Backend:
    """The backend object a call runs on: ``name`` if given, else the one in force."""
    ready = _ready  # taken before any check, see ``_ready``
    if name is None:
        chosen = _scoped_choice.get()
        if chosen is None:
            chosen = _process_choice
            if chosen is None:
                chosen = _default_name()
        source = "the backend in force"
    else:
        chosen, source = name, "backend="
    if type(chosen) is str:
        backend = ready.get(chosen)
        if backend is not None:
            return backend
    backend = _checked(chosen, source)
    ready[chosen] = backend
    return backend


# --------------------------------------------------------------------------- #
# thread budget
# --------------------------------------------------------------------------- #
_num_threads: int | None = None
_env_threads_cache: tuple | None = None  # (TCONV_NUM_THREADS's token, its value)


def _env_threads(token) -> int | None:
    raw = _env_value(token).strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"TCONV_NUM_THREADS must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"TCONV_NUM_THREADS must be a positive integer, got {raw!r}")
    return value


def get_num_threads() -> int:
    """Threads tconv's compute may use: ``set_num_threads``, else
    ``TCONV_NUM_THREADS``, else the cores this process may run on."""
    if _num_threads is not None:
        return _num_threads
    global _env_threads_cache
    token = _env_token("TCONV_NUM_THREADS")
    cached = _env_threads_cache
    if cached is not None and cached[0] == token:
        env = cached[1]
    else:
        env = _env_threads(token)  # raises on a bad value, every time: never cached
        _env_threads_cache = (token, env)
    if env is not None:
        return env
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_num_threads(n: int | None) -> None:
    """Bound the threads of the multicore backends and of BLAS; ``None`` resets.

    Backends split this budget between their own threads and BLAS's so that
    the two never oversubscribe the cores.
    """
    global _num_threads
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"set_num_threads: n must be a positive integer or None, got {n!r}")
    _num_threads = n
    from . import _threads  # here, not at import: threadpoolctl is only needed to compute

    _threads.forget_blas_threads()
