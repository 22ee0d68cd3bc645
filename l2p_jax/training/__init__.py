"""Training: the train state (`train_state`), the update rules and the step's settings
(`rules`), the epoch schedule (`schedule`), the step of every method (`step`), the
objectives and optimizers, the loop (`loop.train_and_evaluate`) and the workdir's lock.
Checkpoints and resuming are `l2p_jax.checkpointing`'s."""
