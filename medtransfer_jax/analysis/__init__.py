"""Post-training analyses of the studies.

Modules (import the one you need; none imports training code; activations come from
``medtransfer_jax.inference.activations``):

* ``similarity``: jitted CCA / SVCCA / PWCCA / CKA / Procrustes kernels on (n, p) arrays.
* ``streaming``: batch-by-batch covariance / minibatch-CKA accumulators for large N.
* ``compare``: the Revisiting CCA protocol preset and general network comparison.
* ``predictions``: prediction similarity, Cohen's kappa, AUC gain over random init.
* ``weight_change``: per-layer relative L2 / cosine between two weight trees.
* ``filters``: 3x3 filter distributions (PCA histograms, KL drift, sparsity, entropy).
* ``plots``: matplotlib (Agg) figures of the above tables.
"""
