"""The demo run (ResNet18 width 16, synthetic lesions, 64 px); embedded in the package.

The file that ``python -m medtransfer_jax.train`` uses by default is
``medtransfer_jax/configs/demo.py``; this copy-free alias keeps ``--config=configs/demo.py``
working from a source checkout.
"""
from medtransfer_jax.configs.demo import get_config  # noqa: F401
