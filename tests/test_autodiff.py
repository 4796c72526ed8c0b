"""Forward- and reverse-mode autodiff through every model: jax.jvp / jacfwd agree with jacrev, with
JAX's own rules for flax's pooling and XLA's convolution, and with finite differences, through
hwrjax's own Conv (both forms of its kernel gradient) and pools."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hwrjax import models
from hwrjax.models import layers

# A smooth activation, so that central finite differences are accurate (a ReLU's kinks between
# x - eps and x + eps would not be); the custom derivatives under test are the Conv's and max pool's.
MODELS = {
    "mlp": dict(name="mlp", hidden_sizes=(12,), activation="gelu"),
    "convnet_max": dict(name="convnet", conv_widths=(3, 4), dense_widths=(6,), pooling="max", batch_norm=True,
                        activation="gelu"),
    "convnet_avg": dict(name="convnet", conv_widths=(3, 4), dense_widths=(6,), pooling="avg", space_to_depth=True,
                        activation="gelu"),
    "resnet": dict(name="resnet", stage_sizes=(1, 1), stage_widths=(3, 4), stem_width=3, activation="gelu"),
}


def _setup(name):
    model = models.create_model(ml_collections.ConfigDict(MODELS[name]), num_classes=5)
    x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
    variables = model.init(jax.random.key(1), x, train=False)
    # Non-trivial BatchNorm statistics and scales, so that every layer passes a signal through.
    variables = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), variables)
    return model, x, variables


def _close(a, b, scale=None):
    scale = float(jnp.max(jnp.abs(b))) if scale is None else scale
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(scale, 1e-6))


@pytest.mark.parametrize("form", ["patch_matrix", "taps"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_jvp_and_jacfwd_agree_with_jacrev_and_finite_differences(name, form, monkeypatch):
    monkeypatch.setattr(layers, "PATCH_MATRIX_LIMIT", 1 << 40 if form == "patch_matrix" else 0)
    model, x, variables = _setup(name)
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    f_x = lambda x_: model.apply(variables, x_, train=False)
    f_p = lambda p: model.apply({"params": p, **rest}, x, train=False)

    # Forward mode with respect to the images: J v against jacrev's J times v, and finite differences.
    v = jax.random.normal(jax.random.key(3), x.shape)
    y, jv = jax.jit(lambda x_, v_: jax.jvp(f_x, (x_,), (v_,)))(x, v)
    _close(y, f_x(x))
    jac = jax.jit(jax.jacrev(f_x))(x)  # [2, 5, 2, 28, 28, 1]
    _close(jv, jnp.tensordot(jac, v, axes=4))
    # Against JAX's own derivatives of flax's pooling and XLA's convolution (an independent rule).
    with layers.flax_reference():
        _, jv_ref = jax.jit(lambda x_, v_: jax.jvp(lambda z: model.apply(variables, z, train=False), (x_,), (v_,)))(x, v)
    _close(jv, jv_ref)
    if MODELS[name].get("pooling") != "max":  # a max pool's kinks make finite differences unreliable
        eps = 1e-3
        fd = (f_x(x + eps * v) - f_x(x - eps * v)) / (2 * eps)
        np.testing.assert_allclose(jv, fd, rtol=5e-2, atol=5e-2 * float(jnp.max(jnp.abs(fd))))

    # jacfwd with respect to every parameter (conv kernels included) equals jacrev.
    fwd, rev = jax.jit(jax.jacfwd(f_p))(params), jax.jit(jax.jacrev(f_p))(params)
    for a, b in zip(jax.tree.leaves(fwd), jax.tree.leaves(rev)):
        _close(a, b)


def test_forward_over_reverse_hessian_vector_product():
    # jvp of a gradient (forward over reverse) equals the gradient of a directional derivative.
    model, x, variables = _setup("convnet_max")
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p, **rest}, x, train=False)))
    v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(4), p.shape), params)
    _, hv_fwd = jax.jvp(jax.grad(loss), (params,), (v,))
    hv_rev = jax.grad(lambda p: sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(jax.grad(loss)(p)),
                                                                   jax.tree.leaves(v))))(params)
    for a, b in zip(jax.tree.leaves(hv_fwd), jax.tree.leaves(hv_rev)):
        _close(a, b)


def test_max_pool_jvp_follows_the_first_maximum():
    # Ties: the tangent of each window's maximum is that of its first maximal element, the element
    # reverse mode sends the gradient to.
    x = jnp.array([[[1.0, 1.0], [0.0, 1.0]]])[..., None]  # one 2x2 window, three tied maxima
    dx = jnp.array([[[5.0, 7.0], [11.0, 13.0]]])[..., None]
    _, t = jax.jvp(lambda a: layers.max_pool(a, (2, 2), (2, 2)), (x,), (dx,))
    assert float(t.reshape(())) == 5.0
    g = jax.grad(lambda a: jnp.sum(layers.max_pool(a, (2, 2), (2, 2))))(x)
    np.testing.assert_array_equal(g[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])
