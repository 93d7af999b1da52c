"""What people would use instead: PyTorch CPU and ONNX Runtime, on the same arrays.

Each peer turns a case into a zero-argument callable (so the timer sees the
call and nothing else) at a given thread count. A peer that is not
installed, or cannot run a case, says so in its ``note``; it is never
replaced by something else.

* PyTorch: ``torch.nn.functional`` on tensors that share the NumPy arrays'
  memory (``torch.from_numpy``), threads set with ``torch.set_num_threads``.
  Backward is PyTorch autograd: the forward graph is built once, then each
  timed call is ``torch.autograd.grad(y, (x, w), grad_y, retain_graph=True)``,
  i.e. the backward pass alone, input and weight gradients.
* ONNX Runtime: a one-node model (``ConvTranspose`` or ``Conv``) built with
  ``onnx.helper``; the weight and bias are initializers, as in a deployed
  model (ORT may pre-pack them when the session is made, outside the
  timing). Session with ``intra_op_num_threads`` = the thread count and
  ``inter_op_num_threads = 1``. ORT's inference runtime has no gradients, so
  backward cases are not run on it.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .layers import Case

__all__ = ["Peer", "Unsupported", "TorchPeer", "OrtPeer", "all_peers"]

Runner = Callable[[], Any]


class Unsupported(Exception):
    """This peer cannot run this case (the message says why)."""


class Peer:
    """A peer implementation: ``name``, ``version``, ``available``, ``note``."""

    name = ""
    label = ""

    def __init__(self) -> None:
        self.version: str | None = None
        self.available = False
        self.note = ""

    def info(self) -> dict[str, Any]:
        return {"name": self.label, "version": self.version, "available": self.available, "note": self.note}

    def runner(self, case: Case, arrays: dict[str, np.ndarray], threads: int) -> Runner:
        """A callable running ``case`` on ``arrays`` with ``threads`` threads.

        Forward returns the output array; backward returns ``(grad_x, grad_weight)``.

        Raises
        ------
        Unsupported
            When this peer cannot run the case.
        """
        raise NotImplementedError


class TorchPeer(Peer):
    name = "torch"
    label = "PyTorch"

    def __init__(self) -> None:
        super().__init__()
        try:
            import torch
        except Exception as exc:  # not installed, or broken
            self.note = f"PyTorch not installed ({type(exc).__name__}: {exc}); skipped"
            return
        self.torch = torch
        self.version = torch.__version__
        self.available = True

    def runner(self, case: Case, arrays: dict[str, np.ndarray], threads: int) -> Runner:
        torch = self.torch
        functional = torch.nn.functional
        layer = case.layer
        torch.set_num_threads(threads)
        x = torch.from_numpy(arrays["x"])
        w = torch.from_numpy(arrays["weight"])
        b = None if arrays["bias"] is None else torch.from_numpy(arrays["bias"])
        if layer.transposed:
            def call(x, w, b):
                return functional.conv_transpose2d(
                    x, w, b, layer.stride, layer.padding, layer.output_padding
                )
        else:
            def call(x, w, b):
                return functional.conv2d(x, w, b, layer.stride, layer.padding)

        if case.direction == "forward":
            def forward():
                return call(x, w, b).numpy()

            return forward

        # autograd needs leaves of its own; the values are the same arrays'
        x = x.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        y = call(x, w, None)
        grad_y = torch.from_numpy(arrays["grad_output"])

        def backward():
            grad_x, grad_w = torch.autograd.grad(y, (x, w), grad_y, retain_graph=True)
            return grad_x.numpy(), grad_w.numpy()

        return backward


class OrtPeer(Peer):
    name = "ort"
    label = "ONNX Runtime"

    def __init__(self) -> None:
        super().__init__()
        try:
            import onnx
            import onnxruntime
        except Exception as exc:
            self.note = f"ONNX Runtime or onnx not installed ({type(exc).__name__}: {exc}); skipped"
            return
        self.onnx = onnx
        self.ort = onnxruntime
        self.version = onnxruntime.__version__
        self.available = True

    def model(self, case: Case, arrays: dict[str, np.ndarray]) -> bytes:
        """The one-node ONNX model of ``case`` (batched: ORT has no unbatched conv)."""
        from onnx import TensorProto, helper, numpy_helper

        layer = case.layer
        x_shape = (layer.n, *layer.input_shape[-3:])
        inputs = ["X", "W"]
        initializers = [numpy_helper.from_array(arrays["weight"], "W")]
        if arrays["bias"] is not None:
            inputs.append("B")
            initializers.append(numpy_helper.from_array(arrays["bias"], "B"))
        attributes = dict(
            kernel_shape=[layer.kernel] * 2,
            strides=[layer.stride] * 2,
            pads=[layer.padding] * 4,
            dilations=[1, 1],
            group=1,
        )
        if layer.transposed:
            node = helper.make_node("ConvTranspose", inputs, ["Y"], output_padding=[layer.output_padding] * 2, **attributes)
        else:
            node = helper.make_node("Conv", inputs, ["Y"], **attributes)
        graph = helper.make_graph(
            [node],
            case.name,
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [layer.n, *layer.output_shape[-3:]])],
            initializer=initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # accepted by every ONNX Runtime of the last years
        self.onnx.checker.check_model(model)
        return model.SerializeToString()

    def runner(self, case: Case, arrays: dict[str, np.ndarray], threads: int) -> Runner:
        if case.direction != "forward":
            raise Unsupported("ONNX Runtime (inference) has no gradient kernels")
        ort = self.ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(self.model(case, arrays), options, providers=["CPUExecutionProvider"])
        layer = case.layer
        x = arrays["x"].reshape(layer.n, *layer.input_shape[-3:])  # a view
        feed = {"X": x}
        out_shape = layer.output_shape

        def forward():
            return session.run(None, feed)[0].reshape(out_shape)

        return forward


def all_peers() -> list[Peer]:
    """Every peer, installed or not (check ``available`` and ``note``)."""
    return [TorchPeer(), OrtPeer()]
