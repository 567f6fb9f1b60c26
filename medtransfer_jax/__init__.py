"""medtransfer_jax: transfer-learning studies for medical imaging in JAX/Flax."""
__version__ = "0.1.0"
