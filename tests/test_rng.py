"""Run keys are typed keys of JAX's PRNG, with the same bits as before they were typed; the mesh's
data axis is an explicit Auto axis."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hwrjax.core import rng
from hwrjax.training import parallel


def test_run_keys_are_typed_and_keep_their_bits():
    keys = rng.RunKeys.from_seed(7)
    for purpose, pid in (("init", 0), ("order", 1), ("augment", 2), ("dropout", 3)):
        key = getattr(keys, purpose)
        assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
        # The bits of untyped threefry keys folded the same way: every run's numbers are unchanged.
        raw = jax.random.fold_in(jax.random.key_data(jax.random.key(7, impl="threefry2x32")), pid)
        np.testing.assert_array_equal(jax.random.key_data(key), raw)
    np.testing.assert_array_equal(jax.random.key_data(rng.RunKeys.from_seed(7).dropout),
                                  jax.random.key_data(keys.dropout))


def test_another_prng_implementation_trains():
    # With JAX's default PRNG set to rbg, the run keys follow it and a train step runs on them.
    code = """if True:
        import jax
        jax.config.update("jax_default_prng_impl", "rbg")
        import jax.numpy as jnp, optax
        from hwrjax import models
        from hwrjax.core import rng, steps, train_state
        keys = rng.RunKeys.from_seed(0)
        assert "rbg" in str(jax.random.key_impl(keys.init)), jax.random.key_impl(keys.init)
        model = models.MLP(hidden_sizes=(8,), dropout_rate=0.5)
        state = train_state.create_train_state(model, optax.sgd(0.1), keys.init)
        batch = {"image": jnp.ones((4, 28, 28, 1)), "label": jnp.arange(4)}
        state, metrics = jax.jit(steps.train_step)(state, batch, jax.random.fold_in(keys.dropout, 0))
        print(float(metrics["loss"]) > 0)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "True"


def test_mesh_has_one_auto_data_axis_over_all_devices():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert list(mesh.devices.flat) == jax.devices()
    sharded = jax.device_put(jnp.arange(8.0 * len(jax.devices())),
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    assert float(jax.jit(jnp.sum)(sharded)) == float(np.arange(8.0 * len(jax.devices())).sum())
