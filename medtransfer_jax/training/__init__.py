"""Fine-tuning: optimisers/freezing, the jitted train step, checkpoints, the loop, sweeps.

Modules: ``optim`` (optax, schedules, freeze policies), ``state`` (TrainState), ``step``
(the jitted train step), ``model_init`` (random init, or ``weights.load_model`` merged
into a fresh head), ``checkpointing`` (orbax run checkpoints), ``loop``
(``train_and_evaluate`` = setup -> run_phase -> finalize), ``presets`` (protocol helpers
over ``configs.base``), ``sweep`` (grids of runs). The mesh lives in
``medtransfer_jax.sharding``; the forward pass (eval step, ``evaluate_source``), metrics
and predictions files in ``medtransfer_jax.inference``, which training imports.
Entry point: ``python -m medtransfer_jax.train``.
"""
