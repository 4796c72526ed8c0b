"""Device mesh and host-to-device placement for data parallel training."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from hwrjax.core.errors import ConfigError

MODES = ("jit", "pmap")


def make_mesh() -> Mesh:
    """A 1-D ('data',) mesh over every device of every process, its axis of type Auto."""
    # Auto, not make_mesh's default Explicit: Linen steps leave sharding decisions to the compiler.
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices())


def put_replicated(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Places the same host array on every device of `sharding` (all processes pass equal data)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def check_same_config_across_processes(config_json: str) -> None:
    """Raises ConfigError if the processes of a multi-process run were given different configs."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(config_json.encode()).digest()[:8], np.uint32)
    all_digests = multihost_utils.process_allgather(digest)
    if not np.all(all_digests == all_digests[0]):
        raise ConfigError("the processes of this run were given different configs; "
                          "launch every process with the same --config and overrides")


def replicate_for_pmap(tree, devices=None):
    """Stacks one copy of every leaf per local device, laid out as jax.pmap expects its inputs."""
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(Mesh(np.asarray(devices), ("replica",)), jax.sharding.PartitionSpec("replica"))

    def replicate(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), sharding)

    return jax.tree.map(replicate, tree)


def any_process(flag: bool) -> bool:
    """True if `flag` is true on any process of the run (every process must call this)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
