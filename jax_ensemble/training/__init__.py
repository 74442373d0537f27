"""Training: the device mesh and partition rules, objectives, orbax checkpoints and the one
training engine (:func:`jax_ensemble.training.engine.train`)."""
