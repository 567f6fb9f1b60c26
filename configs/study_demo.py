"""The demo study (the whole chain on synthetic data); embedded in the package.

``python -m medtransfer_jax.study`` uses ``medtransfer_jax/configs/study_demo.py`` by
default; this alias keeps ``--config=configs/study_demo.py`` working from a checkout.
"""
from medtransfer_jax.configs.study_demo import COMMON, TRAIN, get_config  # noqa: F401
