"""Randomness as a function of (seed, purpose, step): one root key split by purpose."""

from __future__ import annotations

import dataclasses

import jax

# Fixed purpose ids: changing one would change every run's numbers.
_PURPOSES = {"init": 0, "order": 1, "augment": 2, "dropout": 3}


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """Per-purpose typed keys of a run; a step's key is fold_in(purpose_key, step)."""

    init: jax.Array
    order: jax.Array
    augment: jax.Array
    dropout: jax.Array

    @classmethod
    def from_seed(cls, seed: int) -> "RunKeys":
        """Derives the purpose keys from config.seed, as typed keys of JAX's default PRNG implementation
        (threefry2x32 unless jax_default_prng_impl says otherwise)."""
        root = jax.random.key(int(seed))
        return cls(**{name: jax.random.fold_in(root, pid) for name, pid in _PURPOSES.items()})
