"""Layers that train faster on CPU than their flax/XLA equivalents, with the same results.

`Conv`: a 2-D convolution whose kernel gradient is a matrix product on CPU.

XLA's CPU backend computes the forward convolution and the input gradient well, but the
kernel gradient (a convolution of the input with the output gradient) is slow: in the
headline ResNet's train step it took more than half the time. `Conv` computes that
gradient instead with matrix products, the same sum in another order (relative difference
~1e-6) and much faster here; the forward pass and the input gradient stay XLA's own. On GPU
and TPU the plain XLA convolution is used.

Two forms of the same products, chosen by size: for a small input, one product
patches(x)^T @ dy with the kh*kw shifted views of x side by side in one patch matrix; for a
large one, kh*kw products shifted_view(x)^T @ dy, one per kernel tap, without the patch
matrix. Building the patch matrix is a copy kh*kw times the size of x, and once it
outgrows the CPU's caches that copy costs more than the products (12x12x32 maps at batch
128, a 21 MB patch matrix: 21.7 ms vs 5.1 ms per kernel gradient on this machine's 32 MB
L3), while small patch matrices make one large product the faster form (5 MB: 0.60 vs 0.71
ms). The switch is at `PATCH_MATRIX_LIMIT` bytes; benchmarks/kernel_grad.py measures both
forms per shape.

`Conv` is a drop-in for the `flax.linen.Conv` we use (SAME padding, NHWC, HWIO kernel, the
same parameter names and shapes), so checkpoints are interchangeable.

`max_pool` / `avg_pool`: pooling with non-overlapping windows (window == strides, VALID) as a
reshape and a reduction, without the windowed reduction and select-and-scatter of
`nn.max_pool`; other window/stride combinations fall back to flax. Values and gradients are
flax's: the max pool's gradient goes to the first maximum of each window (as
select-and-scatter does), computed elementwise from the window and its maximum.

Both define their derivative in forward mode (`jax.custom_jvp`), as a tangent linear in the
input's and kernel's tangents, so jax.jvp / jacfwd work through them; reverse mode transposes
that tangent, and it is written so that the transpose is the fast form above (matrix products
for the kernel, elementwise selections for the pool): the recipes' train steps compute the same
bits as with the hand-written backward passes (custom_vjp) these replaced, which forward mode
could not differentiate.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_DIMS = ("NHWC", "HWIO", "NHWC")
_REFERENCE = [False]


@contextlib.contextmanager
def flax_reference() -> Iterator[None]:
    """Functions traced inside this block use flax's / XLA's own convolution gradient and pooling.

    For measuring what these layers buy (benchmarks/layers_ab.py) or ruling them out when
    debugging; parameters and values are the same either way. Only tracing inside the block is
    affected, and JAX reuses the trace of a function object it has already seen: jit a new
    function (e.g. a fresh lambda) inside the block.
    """
    _REFERENCE[0] = True
    try:
        yield
    finally:
        _REFERENCE[0] = False
# "auto": the matrix-product kernel gradient on CPU, XLA's elsewhere; "xla" or "matmul" force one.
KERNEL_GRADS = ("auto", "xla", "matmul")


def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    """XLA's SAME padding (low, high) for one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, strides, "SAME", dimension_numbers=_DIMS)


def _shifted_views(x: jax.Array, kh: int, kw: int, strides: tuple[int, int],
                   out_hw: tuple[int, int]) -> list[jax.Array]:
    """The kh*kw [B, Ho, Wo, C] views of the SAME-padded input each kernel tap sees, in HW order
    (strided slices, no gather)."""
    sh, sw = strides
    (t, b), (l, r) = _same_pads(x.shape[1], kh, sh), _same_pads(x.shape[2], kw, sw)
    xp = jnp.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    ho, wo = out_hw
    return [xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw] for i in range(kh) for j in range(kw)]


def _patches(x: jax.Array, kh: int, kw: int, strides: tuple[int, int], out_hw: tuple[int, int]) -> jax.Array:
    """[B*Ho*Wo, kh*kw*C] input patches in HWIO order."""
    cols = _shifted_views(x, kh, kw, strides, out_hw)
    return jnp.concatenate(cols, axis=-1).reshape(-1, kh * kw * x.shape[-1])


# Patch matrices larger than this (bytes) are not built: the kernel gradient is then kh*kw
# products of shifted views. Measured crossover on this project's CPU (32 MB L3) lies
# between 5 and 10 MB; other CPUs may differ (benchmarks/kernel_grad.py). Read when a function
# is traced: set it before jitting (a function already traced keeps its form).
PATCH_MATRIX_LIMIT = 8 << 20


def uses_patch_matrix(x: Any, dy: Any, kh: int, kw: int) -> tuple[bool, int]:
    """(whether the kernel gradient of this convolution is one patch-matrix product, the patch
    matrix's size in bytes), for input `x` and output gradient `dy`."""
    nbytes = dy.size // dy.shape[-1] * kh * kw * x.shape[-1] * x.dtype.itemsize
    return nbytes <= PATCH_MATRIX_LIMIT, nbytes


def _conv_as_products(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                      out_shape: tuple[int, ...]) -> jax.Array:
    """The SAME convolution of x with `kernel` as matrix products of input patches with the kernel.

    Linear in `kernel`, and transposed with respect to it (reverse mode) it is the kernel gradient
    as matrix products: patches(x)^T @ dy as one product, or one shifted_view(x)^T @ dy per tap
    when the patch matrix would exceed PATCH_MATRIX_LIMIT (see the module docstring).
    """
    kh, kw, cin, cout = kernel.shape
    out_hw = out_shape[1:3]
    dy = jax.ShapeDtypeStruct(out_shape, x.dtype)
    if uses_patch_matrix(x, dy, kh, kw)[0]:
        y = jnp.dot(_patches(x, kh, kw, strides, out_hw), kernel.reshape(-1, cout),
                    preferred_element_type=jnp.float32)
    else:
        # Split, not indexed: transposed, the taps' products are stacked, not padded and added.
        taps = jnp.split(kernel.reshape(kh * kw, cin, cout), kh * kw)
        y = functools.reduce(operator.add, [
            jnp.dot(view.reshape(-1, cin), tap[0], preferred_element_type=jnp.float32)
            for view, tap in zip(_shifted_views(x, kh, kw, strides, out_hw), taps)])
    return y.reshape(out_shape).astype(x.dtype)


def _kernel_grad(x: jax.Array, dy: jax.Array, kh: int, kw: int, strides: tuple[int, int]) -> jax.Array:
    """d(loss)/d(kernel) [kh, kw, Cin, Cout] of a SAME convolution, from its input and output gradient:
    the transpose of `_conv_as_products` that reverse mode computes."""
    kernel = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], dy.shape[-1]), x.dtype)
    (dk,) = jax.linear_transpose(lambda k: _conv_as_products(x, k, strides, dy.shape), kernel)(dy)
    return dk


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv_matmul_kernel_grad(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """SAME NHWC convolution whose kernel gradient is computed with matrix products.

    XLA's own convolution forward; its derivative is given in forward mode (a custom JVP), so
    jax.jvp / jacfwd work, and written so that its transpose, which reverse mode uses, is XLA's
    input gradient for x and the matrix-product kernel gradient for the kernel.
    """
    return _conv(x, kernel, strides)


@conv_matmul_kernel_grad.defjvp
def _conv_jvp(strides, primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    y = _conv(x, kernel, strides)
    # Linear in (dx, dkernel): reverse mode transposes the first term into XLA's input gradient
    # (no forward recompute) and the second into matrix products of x with the output gradient.
    dy = _conv(dx, kernel, strides) + _conv_as_products(x, dkernel, strides, y.shape)
    return y, dy


def use_matmul_kernel_grad(mode: str) -> bool:
    if mode not in KERNEL_GRADS:
        raise ValueError(f"kernel_grad must be one of {KERNEL_GRADS}, got {mode!r}")
    return mode == "matmul" or (mode == "auto" and jax.default_backend() == "cpu")


class Conv(nn.Module):
    """SAME-padded 2-D convolution (NHWC), parameters as flax.linen.Conv ('kernel' HWIO, 'bias')."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | int = 1
    padding: str = "SAME"
    use_bias: bool = True
    dtype: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding != "SAME":
            raise ValueError(f"hwrjax.models.layers.Conv supports padding='SAME' only, got {self.padding!r}")
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if use_matmul_kernel_grad(self.kernel_grad) and not _REFERENCE[0]:
            y = conv_matmul_kernel_grad(x, kernel, strides)
        else:
            y = _conv(x, kernel, strides)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(dtype)
        return y


def _windows(x: jax.Array, window: Sequence[int], strides: Sequence[int] | None,
             padding: str) -> tuple[int, int] | None:
    """(wh, ww) when the pooling is non-overlapping and VALID, i.e. a reshape can do it; else None."""
    window = tuple(window)
    strides = (1,) * len(window) if strides is None else tuple(strides)  # flax: no strides = stride 1
    if padding != "VALID" or strides != window or len(window) != 2 or x.ndim != 4:
        return None
    return window


def blocks(x: jax.Array, wh: int, ww: int) -> jax.Array:
    """[B, H, W, C] -> [B, H//wh, wh, W//ww, ww, C], dropping the remainder rows/columns as VALID does."""
    b, h, w, c = x.shape
    ho, wo = h // wh, w // ww
    return x[:, :ho * wh, :wo * ww].reshape(b, ho, wh, wo, ww, c)


def _first_max(xb: jax.Array, y: jax.Array) -> list[list[jax.Array]]:
    """hit[i][j] [B, Ho, Wo, C]: whether window tap (i, j) of `xb` is the first in row-major order to
    hold the window's maximum `y` (where select-and-scatter sends the gradient)."""
    taken = jnp.zeros(y.shape, bool)
    hits = []
    for i in range(xb.shape[2]):
        hits.append([])
        for j in range(xb.shape[4]):
            hit = (xb[:, :, i, :, j] == y) & ~taken
            taken = taken | hit
            hits[i].append(hit)
    return hits


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _block_max(x: jax.Array, wh: int, ww: int) -> jax.Array:
    return blocks(x, wh, ww).max(axis=(2, 4))


@_block_max.defjvp
def _block_max_jvp(wh, ww, primals, tangents):
    (x,), (dx,) = primals, tangents
    xb = blocks(x, wh, ww)
    y = xb.max(axis=(2, 4))
    # The tangent of each window's maximum is that of its first maximal element: linear in dx, and
    # its transpose (reverse mode) puts the output gradient there and zeros elsewhere, as
    # select-and-scatter does; rows and columns a VALID pooling dropped get no gradient.
    # Split, not indexed, so that the transpose assembles the input gradient with concatenations of
    # elementwise selections, which XLA fuses into one loop.
    hits = _first_max(xb, y)
    terms = []
    for i, row in enumerate(jnp.split(blocks(dx, wh, ww), wh, axis=2)):
        for j, tap in enumerate(jnp.split(row, ww, axis=4)):
            tap = jnp.squeeze(tap, (2, 4))
            terms.append(jnp.where(hits[i][j], tap, jnp.zeros_like(tap)))
    return y, functools.reduce(operator.add, terms)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int] | None = None,
             padding: str = "VALID") -> jax.Array:
    """flax.linen.max_pool with the same signature; non-overlapping windows take the fast path."""
    win = None if _REFERENCE[0] else _windows(x, window, strides, padding)
    if win is None:
        return nn.max_pool(x, tuple(window), strides=None if strides is None else tuple(strides), padding=padding)
    return _block_max(x, *win)


def avg_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int] | None = None,
             padding: str = "VALID") -> jax.Array:
    """flax.linen.avg_pool with the same signature; non-overlapping windows take the fast path."""
    win = None if _REFERENCE[0] else _windows(x, window, strides, padding)
    if win is None:
        return nn.avg_pool(x, tuple(window), strides=None if strides is None else tuple(strides), padding=padding)
    return blocks(x, *win).mean(axis=(2, 4))
