"""The tiny study of tests/test_study.py as a config file (for subprocess studies)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_study import _tiny_study_config  # noqa: E402


def get_config(arg=None):
    del arg
    return _tiny_study_config()
