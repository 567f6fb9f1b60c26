"""Test-wide settings: 8 fake CPU devices (sharding tests), Keras on the JAX backend, decoded
images in a temporary folder, and empty file memos in every test."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "MEDTRANSFER_DECODE_CACHE" not in os.environ:
    # Decoded test images go to a folder of this test process (and its subprocesses), not
    # to the user's ~/.cache; it is removed at exit.
    _decoded = tempfile.mkdtemp(prefix="medtransfer-decoded-")
    os.environ["MEDTRANSFER_DECODE_CACHE"] = _decoded
    atexit.register(shutil.rmtree, _decoded, True)

import pytest  # noqa: E402


#: Fixtures that build a full-size ResNet50 (Keras or torchvision): every test using one
#: is 'slow', so ``-m "not slow"`` really skips full ResNet50s.
FULL_RESNET50_FIXTURES = {"source", "converted"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not FULL_RESNET50_FIXTURES & set(getattr(item, "fixturenames", ())):
            continue
        module = item.module.__name__
        callspec = getattr(item, "callspec", None)
        depth = callspec.params.get("source") if callspec is not None else None
        if module == "test_convert_keras" or (module == "test_convert_torchvision"
                                              and depth == 50):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _files_seen_as_by_a_new_process():
    """Each test starts with empty process-level file memos (files found readable, decoded
    pixels). They rightly assume a file does not change within one process, but tests
    reuse paths: the gs:// stand-in maps one URL to a new folder in every test, so a file
    another test found readable was skipped by this one's integrity check."""
    from medtransfer_jax.data import as_new_process
    with as_new_process():
        yield
