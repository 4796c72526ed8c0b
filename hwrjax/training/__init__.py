"""Running a recipe: data, the input pipeline and the one training loop, checkpoints, distributed setup,
preemption, logs and config checks."""
