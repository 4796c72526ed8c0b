"""hwrjax.models.layers: Conv and the pools compute what flax.linen computes, by a faster route on CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hwrjax.models import layers


@pytest.mark.parametrize("form", ["patch_matrix", "taps"])
@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 28), (3, 2, 28), (1, 2, 14), (3, 2, 7), (5, 1, 9)])
def test_matmul_kernel_gradient_equals_xlas(kernel, stride, size, form, monkeypatch):
    # Both forms of the products: one patch matrix (below the limit) and one product per tap (above).
    monkeypatch.setattr(layers, "PATCH_MATRIX_LIMIT", 1 << 40 if form == "patch_matrix" else 0)
    x = jax.random.normal(jax.random.key(0), (3, size, size, 4))
    ours = layers.Conv(6, (kernel, kernel), stride, kernel_grad="matmul")
    ref = nn.Conv(6, (kernel, kernel), stride, padding="SAME")
    variables = ref.init(jax.random.key(1), x)
    # Same parameter tree: checkpoints of either load into the other.
    assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    # The custom gradient really is in use, in the form asked for: one product of a patch matrix
    # (the shifted views concatenated along channels), or one product per kernel tap and no patch
    # matrix (the taps' [Cin, Cout] gradients are stacked along a new first axis).
    ours_jaxpr = str(jax.make_jaxpr(jax.grad(loss(ours), argnums=(0, 1)))(variables, x))
    ref_jaxpr = str(jax.make_jaxpr(jax.grad(loss(ref), argnums=(0, 1)))(variables, x))
    assert "concatenate" not in ref_jaxpr and "dot_general" not in ref_jaxpr
    patch_matrix = "concatenate[dimension=3]"
    if form == "patch_matrix":
        assert (patch_matrix in ours_jaxpr or kernel == 1) and ours_jaxpr.count("dot_general") == 1
    else:
        assert patch_matrix not in ours_jaxpr and ours_jaxpr.count("dot_general") == kernel * kernel
    # forward + input gradient, against forward + input gradient + kernel gradient
    assert ours_jaxpr.count("conv_general_dilated") == 2 and ref_jaxpr.count("conv_general_dilated") == 3


def test_modes():
    assert layers.use_matmul_kernel_grad("matmul") and not layers.use_matmul_kernel_grad("xla")
    assert layers.use_matmul_kernel_grad("auto") == (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="kernel_grad must be one of"):
        layers.use_matmul_kernel_grad("fast")
    with pytest.raises(ValueError, match="padding='SAME' only"):
        layers.Conv(2, (3, 3), padding="VALID").init(jax.random.key(0), jnp.ones((1, 5, 5, 1)))


@pytest.mark.parametrize("size", [28, 7, 5])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_non_overlapping_pools_equal_flax_without_reduce_window(kind, size):
    ours, ref = getattr(layers, f"{kind}_pool"), getattr(nn, f"{kind}_pool")
    # Rounded values and a ReLU-like floor: many windows hold ties, whose gradient must go to the
    # first maximum, as flax's select-and-scatter sends it.
    x = jnp.maximum(jnp.round(jax.random.normal(jax.random.key(0), (2, size, size, 3)) * 2), -1.0)
    f = lambda pool: lambda x: jnp.sum(jnp.cos(pool(x, (2, 2), strides=(2, 2))) * jnp.arange(3.0))
    # Odd sizes drop the last row and column, as VALID does: 7 -> 3.
    assert ours(x, (2, 2), strides=(2, 2)).shape == (2, size // 2, size // 2, 3)
    np.testing.assert_array_equal(ours(x, (2, 2), strides=(2, 2)), ref(x, (2, 2), strides=(2, 2)))
    np.testing.assert_allclose(jax.grad(f(ours))(x), jax.grad(f(ref))(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jax.jit(jax.grad(f(ours)))(x), jax.grad(f(ref))(x), rtol=1e-6, atol=1e-7)
    # The fast path is a reshape and a reduction: no windowed reduction, no select-and-scatter.
    hlo = jax.jit(jax.grad(f(ours))).lower(x).as_text()
    assert "reduce_window" not in hlo and "select_and_scatter" not in hlo
    assert "select_and_scatter" in jax.jit(jax.grad(f(ref))).lower(x).as_text() or kind == "avg"


def test_overlapping_or_padded_pools_fall_back_to_flax():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    np.testing.assert_array_equal(layers.max_pool(x, (3, 3), strides=(2, 2)), nn.max_pool(x, (3, 3), strides=(2, 2)))
    np.testing.assert_array_equal(layers.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME"),
                                  nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME"))
    # No strides means stride 1 in flax: overlapping windows, the flax path.
    np.testing.assert_array_equal(layers.max_pool(x, (2, 2)), nn.max_pool(x, (2, 2)))


def test_flax_reference_switches_to_flax_implementations_with_equal_results():
    from hwrjax import models

    model = models.ConvNet(conv_widths=(4, 8), dense_widths=(), batch_norm=False)
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    variables = model.init(jax.random.key(1), x)
    loss = lambda v: jnp.sum(model.apply(v, x) ** 2)
    ours_hlo = jax.jit(jax.grad(loss)).lower(variables).as_text()
    with layers.flax_reference():
        ref_grads = jax.jit(jax.grad(loss))(variables)
        ref_hlo = jax.jit(jax.grad(loss)).lower(variables).as_text()
    assert "select_and_scatter" in ref_hlo and "select_and_scatter" not in ours_hlo
    assert ours_hlo.count("convolution") < ref_hlo.count("convolution")  # kernel gradients as matmuls
    for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(loss))(variables)), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    # Leaving the block restores the fast paths.
    assert "select_and_scatter" not in jax.jit(jax.grad(lambda v: loss(v) * 2.0)).lower(variables).as_text()
