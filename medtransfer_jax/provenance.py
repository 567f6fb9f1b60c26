"""Which code made an output: a fingerprint of the installed package's source.

A resumed study keeps the stages it finished earlier; when the library changed in between
(a fix, a new default), their results are of the older code. The fingerprint, written
beside each finished stage, lets the study say so instead of mixing the two silently.
"""
from __future__ import annotations

import functools
import hashlib
import os


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """12 hex digits of SHA-256 over the package's .py and .json files (path and bytes,
    in sorted order): the same for every process of one installed version."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".json")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:12]
