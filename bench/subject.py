"""The thing under test: tconv's backends, run through the public functions.

Besides the runner, three probes that explain a figure:

* :func:`describe_plan` - the algorithm a backend chose for a case, when the
  backend says (``describe_plan(primitive, *args)`` with the arguments the
  primitive is called with, or a ``last_plan`` attribute set by the last call);
* :func:`blas_threads` - the thread count the core's BLAS is at after a call,
  to see that ``tconv.set_num_threads`` reached it;
* :func:`gemm_floor` - the bare GEMMs a GEMM + col2im method does on the
  case's sizes, to time beside it, so the rest (scatter/gather, copies,
  dispatch) can be told apart from the GEMM.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import tconv

from .layers import Case

__all__ = ["runner", "describe_plan", "blas_threads", "gemm_shapes", "gemm_floor"]


def runner(backend: str, case: Case, arrays: dict[str, np.ndarray]) -> Callable[[], Any]:
    """A zero-argument callable running ``case`` on ``backend`` (threads: ``tconv.set_num_threads``).

    Forward returns the output; backward returns ``(grad_x, grad_weight)``.
    """
    layer = case.layer
    x, w, b = arrays["x"], arrays["weight"], arrays["bias"]
    if case.direction == "forward":
        if layer.transposed:
            def forward():
                return tconv.conv_transpose2d(
                    x, w, b, layer.stride, layer.padding, layer.output_padding, backend=backend
                )
        else:
            def forward():
                return tconv.conv2d(x, w, b, layer.stride, layer.padding, backend=backend)
        return forward

    grad_y = arrays["grad_output"]
    needs = ("input", "weight")
    if layer.transposed:
        def backward():
            grad_x, grad_w, _ = tconv.conv_transpose2d_backward(
                grad_y, x, w, layer.stride, layer.padding, layer.output_padding, needs=needs, backend=backend
            )
            return grad_x, grad_w
    else:
        def backward():
            grad_x, grad_w, _ = tconv.conv2d_backward(
                grad_y, x, w, layer.stride, layer.padding, needs=needs, backend=backend
            )
            return grad_x, grad_w
    return backward


def _primitive_calls(case: Case, arrays: dict[str, np.ndarray]) -> dict[str, tuple]:
    """``{role: (primitive, *args)}`` as ``tconv.functional`` would call the backend."""
    from tconv._args import prepare  # internal: the normalised arrays and Geometry

    layer = case.layer
    backward = case.direction == "backward"
    call = prepare(
        transposed=layer.transposed, ndim=2, x=arrays["x"], weight=arrays["weight"],
        bias=None if backward else arrays["bias"], stride=layer.stride, padding=layer.padding,
        output_padding=layer.output_padding if layer.transposed else 0,
        grad_output=arrays.get("grad_output") if backward else None, backward=backward,
    )
    g = call.geom
    if not backward:
        primitive = "scatter" if layer.transposed else "gather"
        return {"forward": (primitive, call.x, call.weight, call.bias, g)}
    dy = call.grad_output
    if layer.transposed:  # both gradients at once, as tconv.functional asks for them
        return {"backward": ("gather_and_weight_grad", dy, call.weight, call.x, g)}
    return {
        "grad_input": ("scatter", dy, call.weight, None, g),
        "grad_weight": ("weight_grad", call.x, dy, g),
    }


def describe_plan(backend: str, case: Case, arrays: dict[str, np.ndarray]) -> Any:
    """The backend's own account of how it runs ``case``, or None if it gives none.

    Looks for ``describe_plan(primitive, *args)`` on the backend object (the
    arguments are those the primitive receives), then for a ``last_plan``
    attribute left by the last call.
    """
    engine = tconv.registry.resolve_backend(backend)
    describe = getattr(engine, "describe_plan", None)
    if callable(describe):
        try:
            plans = {
                role: describe(primitive, *args)
                for role, (primitive, *args) in _primitive_calls(case, arrays).items()
            }
        except Exception as exc:  # a probe must not stop the benchmark
            return {"error": f"{type(exc).__name__}: {exc}"}
        return plans[next(iter(plans))] if len(plans) == 1 else plans
    last = getattr(engine, "last_plan", None)
    return last if last is not None else None


def blas_threads() -> int | None:
    """Threads of the core's BLAS (``tconv._blas_library``) right now, per threadpoolctl."""
    from .machine import core_blas

    blas = core_blas()
    return None if blas is None else blas.get("num_threads")


def gemm_shapes(case: Case) -> list[tuple[int, int, int]]:
    """``(m, n, k)`` of the GEMMs a GEMM + col2im method does, the batch folded into ``n``.

    Forward of a transposed convolution: columns ``(C_out k^2) x (N grid)`` =
    weight^T ``(C_out k^2) x C_in`` @ input ``C_in x (N grid)``. Backward:
    the input gradient (same sizes, roles swapped) and the weight gradient
    ``C_in x (C_out k^2)`` summed over ``N grid``.
    """
    layer = case.layer
    taps = layer.kernel**2
    cells = layer.n * layer.grid_size[0] * layer.grid_size[1]
    if layer.transposed:
        dense, thin = layer.c_out * taps, layer.c_in
    else:
        dense, thin = layer.c_in * taps, layer.c_out
    if case.direction == "forward":
        return [(dense, cells, thin)]
    return [(thin, cells, dense), (thin, dense, cells)]


def gemm_floor(case: Case, threads: int) -> Callable[[], None]:
    """A callable running the case's bare GEMMs through the core's BLAS at ``threads`` threads.

    Operands are fresh Fortran-ordered arrays, so this is the best such a
    method can do: what tconv takes beyond it is scatter/gather, copies and
    dispatch. It is timed in the same rounds as tconv and the peers.
    """
    from tconv._blas_backend import _blas_core
    from tconv._threads import set_blas_threads  # tconv's own switch, so its cache stays true

    rng = np.random.default_rng(0)
    operands = []
    for m, n, k in gemm_shapes(case):
        a = np.asfortranarray(rng.standard_normal((m, k), dtype=np.float32))
        b = np.asfortranarray(rng.standard_normal((k, n), dtype=np.float32))
        operands.append((a, b, np.zeros((m, n), dtype=np.float32, order="F")))

    def run() -> None:
        set_blas_threads(threads)  # a backend called before may have left BLAS at another count
        for a, b, c in operands:
            _blas_core.blas_matmul(a, b, c)

    return run
