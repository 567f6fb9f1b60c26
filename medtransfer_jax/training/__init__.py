"""Fine-tuning: optimisers/freezing, jitted steps, checkpoints, the loop, sweeps.

Modules: ``optim`` (optax, schedules, freeze policies), ``state`` (TrainState), ``step``
(jitted train/eval steps), ``checkpointing`` (orbax run checkpoints), ``loop``
(``train_and_evaluate`` = setup -> run_phase -> finalize), ``presets`` (config
builders), ``sweep`` (grids of runs). The mesh lives in ``medtransfer_jax.sharding``
and the forward pass, metrics and predictions files in ``medtransfer_jax.inference``.
Entry point: ``python -m medtransfer_jax.train``.
"""
