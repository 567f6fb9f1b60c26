"""Fine-tuning: sharding, optimisers/freezing, jitted steps, metrics, checkpoints, the loop.

Modules: ``sharding`` (mesh, NamedSharding, multi-host), ``optim`` (optax, schedules,
freeze policies), ``state`` (TrainState), ``step`` (jitted train/eval steps), ``metrics``
(exact AUC variants), ``checkpointing`` (orbax run checkpoints), ``loop``
(``train_and_evaluate``), ``predictions`` (predictions CSV), ``presets`` (config
builders), ``sweep`` (grids of runs). Entry points: ``python -m medtransfer_jax.train``
and ``python -m medtransfer_jax.evaluate``.
"""
