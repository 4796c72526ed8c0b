"""The two forms of hwrjax.models.layers.Conv's kernel gradient, per convolution and per train step.

  python benchmarks/kernel_grad.py                          # resnet, fast, cnn
  python benchmarks/kernel_grad.py --configs=resnet --repeats=9

For every distinct convolution of a recipe's model at its batch size (shapes recorded by running
the model once), the kernel gradient is timed as one patch-matrix product, as one product per
kernel tap, and as XLA's own convolution gradient; the form `layers.PATCH_MATRIX_LIMIT` picks is
marked. Then the recipe's whole train step is timed with the limit as shipped, with every kernel
gradient as one patch matrix, and with every one as per-tap products. Timings alternate between
the variants (medians over --repeats runs), so the machine's noise hits each alike.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import RecipeStep, time_alternating  # noqa: E402
from hwrjax import models  # noqa: E402
from hwrjax.models import layers  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["resnet", "fast", "cnn"], "Recipes under configs/ to measure.")
flags.DEFINE_integer("steps", 5, "Train steps per timed run (kernel gradients: 4x as many).")
flags.DEFINE_integer("repeats", 7, "Timed runs per variant; medians are reported.")
flags.DEFINE_string("output", "", "Optional JSON file for the figures.")

# PATCH_MATRIX_LIMIT that forces each form; the whole-step variants add the shipped value (None).
FORMS = {"patch matrix": 1 << 62, "per tap": 0}
STEP_VARIANTS = {"as shipped": None, **FORMS}


@contextlib.contextmanager
def patch_matrix_limit(limit: int | None):
    """layers.PATCH_MATRIX_LIMIT set to `limit` (None: unchanged) for what is traced inside."""
    original = layers.PATCH_MATRIX_LIMIT
    layers.PATCH_MATRIX_LIMIT = original if limit is None else limit
    try:
        yield
    finally:
        layers.PATCH_MATRIX_LIMIT = original


def conv_shapes(model: nn.Module, batch_size: int) -> list[tuple]:
    """(input shape, kernel shape, strides) of each distinct layers.Conv the model calls."""
    seen = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, layers.Conv) and context.method_name == "__call__":
            strides = (module.strides,) * 2 if isinstance(module.strides, int) else tuple(module.strides)
            entry = (tuple(args[0].shape), (*module.kernel_size, args[0].shape[-1], module.features), strides)
            if entry not in seen:
                seen.append(entry)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                          jnp.zeros((batch_size, 28, 28, 1)), train=False))
    return seen


def _xla_kernel_grad(x, dy, kernel_shape, strides):
    conv = lambda k: jax.lax.conv_general_dilated(x, k, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vjp(conv, jnp.zeros(kernel_shape, x.dtype))[1](dy)[0]


def time_kernel_grads(x_shape, kernel_shape, strides) -> dict:
    kh, kw, _, cout = kernel_shape
    out_hw = tuple(-(-n // s) for n, s in zip(x_shape[1:3], strides))
    data = np.random.default_rng(0)
    x = jnp.asarray(data.standard_normal(x_shape, dtype=np.float32))
    dy = jnp.asarray(data.standard_normal((x_shape[0], *out_hw, cout), dtype=np.float32))
    compiled = {}
    for form, limit in FORMS.items():
        with patch_matrix_limit(limit):
            fn = functools.partial(layers._kernel_grad, kh=kh, kw=kw, strides=strides)
            compiled[form] = jax.jit(fn).lower(x, dy).compile()
    compiled["xla"] = jax.jit(functools.partial(_xla_kernel_grad, kernel_shape=kernel_shape,
                                                strides=strides)).lower(x, dy).compile()
    reference = compiled["xla"](x, dy)
    scale = float(jnp.max(jnp.abs(reference)))
    for form, fn in compiled.items():
        err = float(jnp.max(jnp.abs(fn(x, dy) - reference))) / scale
        if err > 1e-4:
            sys.exit(f"kernel_grad: the {form} form differs from XLA's gradient by {err:.1e} at {x_shape}")
    fns = {form: (lambda s, fn=fn: (s, fn(x, dy))) for form, fn in compiled.items()}
    medians, _ = time_alternating(fns, dict.fromkeys(fns, 0), 4 * FLAGS.steps, FLAGS.repeats)
    patch, patch_bytes = layers.uses_patch_matrix(x, dy, kh, kw)
    shipped = "patch matrix" if patch else "per tap"
    return {"input": list(x_shape), "kernel": list(kernel_shape), "strides": list(strides),
            "patch_matrix_mb": patch_bytes / 2**20, "shipped_form": shipped,
            "ms": {form: 1000 * t for form, t in medians.items()}}


def time_steps(config) -> dict:
    setup = RecipeStep(config)
    compiled, states, losses_seen = {}, {}, {}
    for name, limit in STEP_VARIANTS.items():
        with patch_matrix_limit(limit):
            compiled[name] = setup.compile(donate_argnums=0)
        states[name], metrics = setup.bind(compiled[name])(setup.new_state())
        losses_seen[name] = float(metrics["loss"])
    if max(losses_seen.values()) - min(losses_seen.values()) > 1e-4:
        sys.exit(f"kernel_grad: the variants' first-step losses differ: {losses_seen}")
    fns = {name: setup.bind(fn) for name, fn in compiled.items()}
    medians, _ = time_alternating(fns, states, FLAGS.steps, FLAGS.repeats)
    return {name: setup.batch_size / t for name, t in medians.items()}


def main(argv):
    del argv
    results = []
    for name in FLAGS.configs:
        config = importlib.import_module(f"configs.{name}").get_config()
        model = models.create_model(config.model, 10, dtype=config.dtype)
        shapes = conv_shapes(model, config.batch_size)
        if not shapes:
            print(f"{name}: no hwrjax.models.layers.Conv in this model; nothing to measure")
            continue
        print(f"\n{name} (batch {config.batch_size}): kernel gradient per convolution, ms "
              f"(jax {jax.__version__}, {jax.default_backend()}, PATCH_MATRIX_LIMIT {layers.PATCH_MATRIX_LIMIT >> 20} MiB)")
        print(f"  {'input':<18} {'kernel':<16} {'stride':>6} {'patch MB':>8} {'patch matrix':>12} {'per tap':>8} "
              f"{'xla':>7}  shipped")
        rows = []
        for x_shape, kernel_shape, strides in shapes:
            r = time_kernel_grads(x_shape, kernel_shape, strides)
            rows.append(r)
            print(f"  {str(x_shape):<18} {str(kernel_shape):<16} {strides[0]:>6} {r['patch_matrix_mb']:>8.1f} "
                  f"{r['ms']['patch matrix']:>12.2f} {r['ms']['per tap']:>8.2f} {r['ms']['xla']:>7.2f}  "
                  f"{r['shipped_form']}")
        steps = time_steps(config)
        print("  whole train step, img/s: " + ", ".join(f"{k} {v:.0f}" for k, v in steps.items())
              + f"  (as shipped / patch matrix: {steps['as shipped'] / steps['patch matrix']:.3f}x)")
        results.append({"config": name, "batch_size": config.batch_size, "convolutions": rows,
                        "step_images_per_s": steps})
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
