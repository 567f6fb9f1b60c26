"""Running trained weights: predictions, metrics, evaluation, activations.

Sits between training (which calls it for its final evaluation) and analysis (which
reads what it writes). Modules: ``metrics`` (the one ROC-AUC and its variants),
``predictions`` (the predictions CSV contract: writer and reader), ``evaluation``
(a checkpoint on a dataset's splits; ``python -m medtransfer_jax.evaluate``),
``activations`` (named intermediate layers, on the mesh).
"""
