"""The pure training core: state, steps, moving average, losses, optimizers, keys, augmentation.

jax, flax, optax and numpy only (no TensorFlow, Orbax or config files): what other JAX projects import.
"""
