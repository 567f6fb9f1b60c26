"""Running trained weights: the forward pass, predictions, metrics, evaluation, activations.

Modules: ``predict`` (the one mesh-sharded forward pass: the eval step and
``evaluate_source``, every example once in source order, the same on 1 or N devices),
``metrics`` (the one ROC-AUC and its variants), ``predictions`` (the predictions CSV
contract: the writer and the one reader), ``evaluation`` (a checkpoint on a dataset's
splits; ``python -m medtransfer_jax.evaluate``), ``activations`` (named intermediate
layers, on the mesh). Weights are loaded with ``weights.checkpoint.load_model``.

Imports go down only: sharding, models, weights, data. training sits above it (its
validation and final evaluation call ``predict``), analysis reads what it writes.
"""
