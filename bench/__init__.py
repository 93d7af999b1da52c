"""tconv's benchmark suite: ``python -m bench`` (see README, "Benchmark").

Real network layers, float32 NCHW, run on every available tconv backend
side by side with PyTorch and ONNX Runtime at 1 and 2 threads. Each result
is checked against the peers before it is timed. The large shapes are also
timed at 1 and 2 threads side by side, for a thread-scaling figure that a
change of load between the two tables cannot skew.

Modules: :mod:`~bench.layers` (the cases), :mod:`~bench.peers` (PyTorch, ONNX
Runtime), :mod:`~bench.subject` (tconv and its probes), :mod:`~bench.timing`
(median time, extra memory), :mod:`~bench.machine` (CPU, BLAS, GEMM peak),
:mod:`~bench.suite` (the run), :mod:`~bench.summary` (the targets),
:mod:`~bench.report` (tables, JSON, chart).
"""

from .suite import Options, run_suite

__all__ = ["Options", "run_suite"]
