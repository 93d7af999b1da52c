"""The suite's cases: real network layers, float32 NCHW.

Each :class:`Layer` is one call shape taken from a network people run; a
:class:`Case` is a layer run forward, or backward (input and weight
gradients). The list is the one in the benchmark issue; change it there
first, so the figures stay comparable from run to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

__all__ = ["Layer", "Case", "LAYERS", "CASES", "QUICK", "DCGAN_PEAK", "SCALING_CASES", "SEED", "select"]


@dataclass(frozen=True)
class Layer:
    """One convolution call shape.

    Attributes
    ----------
    name : str
        Short unique name, matched by ``--layers``.
    network : str
        Where the shape comes from, for the reader.
    op : {"conv_transpose2d", "conv2d"}
        The tconv / PyTorch function that runs it.
    batch : int or None
        ``None`` is an unbatched ``(C, H, W)`` input.
    c_in, size, c_out, kernel, stride, padding, output_padding
        PyTorch's arguments (square kernels, equal strides and paddings).
    bias : bool
        Whether the network's layer has a bias (DCGAN and FCN do not).
    """

    name: str
    network: str
    op: str
    batch: int | None
    c_in: int
    size: tuple[int, int]
    c_out: int
    kernel: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    bias: bool = True

    @property
    def transposed(self) -> bool:
        return self.op == "conv_transpose2d"

    @property
    def n(self) -> int:
        return 1 if self.batch is None else self.batch

    @property
    def out_size(self) -> tuple[int, int]:
        """Spatial output size (PyTorch's formulas, dilation 1)."""
        if self.transposed:
            return tuple(
                (i - 1) * self.stride - 2 * self.padding + self.kernel + self.output_padding
                for i in self.size
            )
        return tuple((i + 2 * self.padding - self.kernel) // self.stride + 1 for i in self.size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The strided side: a transposed convolution's input, a convolution's output."""
        return self.size if self.transposed else self.out_size

    @property
    def input_shape(self) -> tuple[int, ...]:
        spatial = (self.c_in, *self.size)
        return spatial if self.batch is None else (self.batch, *spatial)

    @property
    def output_shape(self) -> tuple[int, ...]:
        spatial = (self.c_out, *self.out_size)
        return spatial if self.batch is None else (self.batch, *spatial)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        k = (self.kernel, self.kernel)
        return (self.c_in, self.c_out, *k) if self.transposed else (self.c_out, self.c_in, *k)

    @property
    def flops(self) -> int:
        """Forward multiply-adds times two: ``2 N C_in C_out prod(grid) prod(k)``.

        For a transposed convolution the grid is its input, as the issue's
        formula ``2 * N * C_in * prod(in) * C_out * prod(k)`` says.
        """
        return 2 * self.n * self.c_in * self.c_out * prod(self.grid_size) * self.kernel**2

    def describe(self) -> str:
        """One line: ``64x512x4x4->256 k4 s2 p1``."""
        batch = "" if self.batch is None else f"{self.batch}x"
        text = f"{batch}{self.c_in}x{self.size[0]}x{self.size[1]}->{self.c_out} k{self.kernel} s{self.stride} p{self.padding}"
        if self.output_padding:
            text += f" op{self.output_padding}"
        return text

    def arrays(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Float32 inputs: standard normal ``x``, weight scaled as PyTorch's init.

        The seed example uses the worked example of SPEC instead, so its
        output can be checked against the known numbers too.
        """
        if self.name == SEED:
            x = np.array([[[[1, 2], [3, 4]]]], dtype=np.float32)
            w = np.array([[[[1, 2, 3], [2, 2, 1], [3, 2, 1]]]], dtype=np.float32)
            return {"x": x, "weight": w, "bias": None}
        rng = np.random.default_rng(seed)
        fan_in = self.c_in * self.kernel**2
        bound = 1.0 / np.sqrt(fan_in)
        x = rng.standard_normal(self.input_shape, dtype=np.float32)
        w = rng.uniform(-bound, bound, self.weight_shape).astype(np.float32)
        b = rng.uniform(-bound, bound, (self.c_out,)).astype(np.float32) if self.bias else None
        return {"x": x, "weight": w, "bias": b}

    def grad_output(self, seed: int = 1) -> np.ndarray:
        """A standard normal gradient of the output's shape, for backward cases."""
        return np.random.default_rng(seed).standard_normal(self.output_shape, dtype=np.float32)


@dataclass(frozen=True)
class Case:
    """A layer in one direction: ``"forward"`` or ``"backward"`` (input and weight gradients)."""

    layer: Layer
    direction: str = "forward"

    @property
    def name(self) -> str:
        return self.layer.name + (".bwd" if self.direction == "backward" else "")

    @property
    def quick(self) -> bool:
        """Part of the ``--quick`` subset."""
        return self.name in QUICK

    @property
    def flops(self) -> int:
        """Backward computes two GEMM-sized products (input and weight gradients)."""
        return self.layer.flops * (2 if self.direction == "backward" else 1)


#: The SPEC worked example: the per-call overhead probe.
SEED = "seed"

_T = "conv_transpose2d"
LAYERS: tuple[Layer, ...] = (
    Layer(SEED, "SPEC worked example", _T, 1, 1, (2, 2), 1, 3, bias=False),
    Layer("dcgan.b64.100-512", "DCGAN generator", _T, 64, 100, (1, 1), 512, 4, 1, 0, bias=False),
    Layer("dcgan.b64.512-256", "DCGAN generator", _T, 64, 512, (4, 4), 256, 4, 2, 1, bias=False),
    Layer("dcgan.b64.256-128", "DCGAN generator", _T, 64, 256, (8, 8), 128, 4, 2, 1, bias=False),
    Layer("dcgan.b64.128-64", "DCGAN generator", _T, 64, 128, (16, 16), 64, 4, 2, 1, bias=False),
    Layer("dcgan.b64.64-3", "DCGAN generator", _T, 64, 64, (32, 32), 3, 4, 2, 1, bias=False),
    Layer("dcgan.b1.128-64", "DCGAN generator", _T, 1, 128, (16, 16), 64, 4, 2, 1, bias=False),
    Layer("unet.b1.512-256", "U-Net up-convolution", _T, 1, 512, (32, 32), 256, 2, 2),
    Layer("unet.b8.128-64", "U-Net up-convolution", _T, 8, 128, (64, 64), 64, 2, 2),
    Layer("fcn32s", "FCN-32s upsampling", _T, 1, 21, (7, 7), 21, 64, 32, bias=False),
    Layer("fcn8s", "FCN-8s upsampling", _T, 1, 21, (28, 28), 21, 16, 8, bias=False),
    Layer("fsrcnn", "FSRCNN deconvolution", _T, 1, 56, (64, 64), 1, 9, 3, 4, 2),
    Layer("autoenc.b128", "autoencoder decoder", _T, 128, 32, (7, 7), 16, 3, 2, 1, 1),
    Layer("s1k3.64-64", "stride-1 3x3", _T, 1, 64, (56, 56), 64, 3, 1, 1),
    Layer("conv1x1.image", "seed's image convolution Conv2d(4, 8, 1)", "conv2d", None, 4, (816, 1022), 8, 1),
)

_BY_NAME = {layer.name: layer for layer in LAYERS}

#: The three batch-64 DCGAN layers held to the GEMM-peak target.
DCGAN_PEAK: tuple[str, ...] = ("dcgan.b64.512-256", "dcgan.b64.256-128", "dcgan.b64.128-64")
#: The issue's "large benchmark shapes", held to the thread-scaling target
#: (2 threads >= 1.7x as fast as 1): the batch-64 DCGAN layers and the batch-8
#: U-Net. Each does 2 to 4 GFLOP, enough work for two threads to share; the
#: small cases measure per-call overhead, which more threads cannot divide.
SCALING_CASES: tuple[str, ...] = (*DCGAN_PEAK, "unet.b8.128-64")
#: Cases of ``--quick``: the seed, two DCGAN layers, one U-Net, one backward.
QUICK: tuple[str, ...] = ("seed", "dcgan.b64.512-256", "dcgan.b1.128-64", "unet.b1.512-256", "autoenc.b128.bwd")

_BACKWARD = [layer for layer in LAYERS if layer.network in ("DCGAN generator", "autoencoder decoder")]

CASES: tuple[Case, ...] = tuple(
    [Case(layer, "forward") for layer in LAYERS] + [Case(layer, "backward") for layer in _BACKWARD]
)


def select(patterns: list[str] | None = None, quick: bool = False) -> list[Case]:
    """Cases whose name contains any of ``patterns`` (all when none), of the quick set if asked.

    Raises
    ------
    ValueError
        When nothing matches (the message lists the names).
    """
    chosen = [c for c in CASES if not quick or c.quick]
    if patterns:
        chosen = [c for c in chosen if any(p.lower() in c.name.lower() for p in patterns)]
    if not chosen:
        names = ", ".join(c.name for c in CASES)
        raise ValueError(f"no case matches --layers {patterns!r}; cases: {names}")
    return chosen
