"""Embedded configs and the one config toolbox: load ``FILE[:ARG]``, dotted overrides, resolve.

The package's own defaults live here, not in the repository's ``configs/``, so the
mains work from any directory after a non-editable ``pip install .``:

* ``demo.py``: the synthetic demo run (default of ``python -m medtransfer_jax.train``);
* ``study_demo.py``: the demo study (default of ``python -m medtransfer_jax.study``);
* ``base.py``: the run schema, :func:`base.base_config` (every field a run reads) and
  :func:`base.demo_config`, which training.presets and the ``configs/`` files build on;
* ``study_options.py``: a study's ``analysis.*`` options, their defaults and choices,
  which every study config starts from.

:func:`path` names them. The mains override fields with ml_collections ``config_flags``
(``--config.train.lr=0.01``); everything else that overrides fields from strings (the
sweep, the study, ``analyze --data_override``) goes through :func:`override`, and a
sweep hands its runs the file :func:`write_resolved` wrote, so a run started in this
process and one started as ``python -m medtransfer_jax.train`` read the same values.
This module imports nothing from the project (it sits at the bottom of the house);
``base.py`` imports only data's defaults.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
import pprint
from typing import Any, Iterable, Optional

import ml_collections

from medtransfer_jax.errors import ConfigError

_HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED = ("demo", "study_demo")


def path(name: str) -> str:
    """Absolute path of the embedded config ``name`` ('demo' or 'demo.py')."""
    stem = name[:-3] if name.endswith(".py") else name
    if stem not in EMBEDDED:
        raise ConfigError(f"no embedded config {name!r}; embedded: {', '.join(EMBEDDED)}")
    return os.path.join(_HERE, stem + ".py")


def missing_file_hint(file: str) -> str:
    """How to fix a config path that does not exist: a relative ``configs/...`` path is the
    repository's folder, which ``pip install`` does not install."""
    if not os.path.isabs(file) and file.replace(os.sep, "/").startswith("configs/"):
        return ("the repository's configs/ folder is not installed with the package: run from "
                "the checkout, or give the file's absolute path")
    return "check the path (the embedded defaults need no --config)"


def load(spec: str) -> ml_collections.ConfigDict:
    """``get_config(ARG)`` of the file in ``FILE[:ARG]`` (as ``--config=FILE:ARG`` would).

    Raises:
      ConfigError: the file is missing, has no ``get_config`` or rejects ``ARG``.
    """
    file, sep, arg = spec.partition(":")
    if not os.path.isfile(file):
        raise ConfigError(f"config file {file} not found (from {spec!r}); "
                          f"{missing_file_hint(file)}")
    mod_spec = importlib.util.spec_from_file_location(
        "medtransfer_cfg_" + os.path.splitext(os.path.basename(file))[0], file)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config")
    except Exception as e:  # a config file is user code: report it, do not crash
        raise ConfigError(f"config file {file} cannot be loaded: {type(e).__name__}: {e}") from e
    try:
        return get_config(arg) if sep else get_config()
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{spec}: {e}") from e


def _field_names(node, prefix: str = "") -> list:
    out = []
    for k, v in node.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out += _field_names(v, prefix + k + ".")
    return out


def unknown_field_message(cfg, key: str, origin: str) -> str:
    """'origin: the config has no field KEY (did you mean ...?)' for a bad dotted key."""
    close = difflib.get_close_matches(key, _field_names(cfg), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    parent, _, _ = key.rpartition(".")
    node = cfg
    for p in parent.split(".") if parent else []:
        node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(node, ml_collections.ConfigDict):
        hint += f" ({parent or 'the config'} has: {', '.join(sorted(node.keys()))})"
    return f"{origin}: the config has no field {key!r}{hint}"


def _parse(raw: str, current: Any, origin: str) -> Any:
    """``raw`` as the type of the field's current value (config_flags' rules); ``None``
    unsets any field (e.g. ``model.preprocessing=None``: take it from the weights)."""
    if raw.strip() == "None":
        return None
    try:
        if isinstance(current, bool):
            low = raw.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return low in ("true", "1", "yes")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, str):  # 'quoted' (a Python literal) or bare
            quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
            return ast.literal_eval(raw) if quoted else raw
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(raw) if raw.strip()[:1] in "([" else raw.split(",")
            return type(current)(value)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{origin}: {raw!r} is not a {type(current).__name__} "
                          f"(the field's current value is {current!r})") from None
    try:  # a field without a typed default (None): a Python literal, else the string
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def override(cfg: ml_collections.ConfigDict, items: Iterable[str],
             flag: str = "override") -> ml_collections.ConfigDict:
    """Applies ``['train.lr=0.01', 'data.fold=2']`` to ``cfg`` in place (and returns it).

    Values parse as the type of the field they replace; unknown fields are an error
    (with the closest field names), never a silently added key.
    """
    for item in items:
        key, sep, raw = item.partition("=")
        key, origin = key.strip(), f"--{flag}={item}"
        if not sep or not key:
            raise ConfigError(f"{origin}: expected key=value, e.g. train.lr=0.01")
        node, parts = cfg, key.split(".")
        for p in parts[:-1]:
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                raise ConfigError(unknown_field_message(cfg, key, origin))
            node = node[p]
        if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
            raise ConfigError(unknown_field_message(cfg, key, origin))
        value = _parse(raw, node[parts[-1]], origin)
        with node.unlocked():
            try:
                node[parts[-1]] = value
            except TypeError as e:
                raise ConfigError(f"{origin}: {e}") from None
    return cfg


def resolve(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """``load(spec)`` then :func:`override`: the one route from strings to a run config."""
    return override(load(spec), overrides)


def write_resolved(cfg: ml_collections.ConfigDict, file: str,
                   origin: Optional[str] = None) -> str:
    """Writes ``cfg`` as a self-contained config file (``get_config()`` returns it).

    All references are resolved to values, so the file says exactly what a run used
    and ``--config=<file>`` in a subprocess gives the same ConfigDict as ``cfg``.
    """
    d = cfg.to_dict()
    _check_finite(d)
    text = (f'"""Resolved config{" of " + origin if origin else ""} (written by the sweep; '
            'do not edit: rerun the sweep)."""\n'
            "import ml_collections\n\nCONFIG = " + pprint.pformat(d, width=96) + "\n\n\n"
            "def get_config(arg=None):\n"
            "    if arg:  # its values are final: a misspelled argument must not pass\n"
            "        raise ValueError(f'a resolved config takes no argument, got {arg!r}; '\n"
            "                         'override fields with --config.FIELD=VALUE')\n"
            "    return ml_collections.ConfigDict(CONFIG)\n")
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, file)
    return file


def check_batch_sizes(cfg: ml_collections.ConfigDict, num_devices: int = 0) -> None:
    """Positive ``train``/``eval`` batch sizes that split evenly over the mesh.

    ``num_devices`` 0 checks only the signs (before JAX is imported); the mesh is
    ``sharding.num_devices`` devices if set, else all of them.

    Raises:
      ConfigError: naming the ``--config.`` field and a valid value.
    """
    mesh = int((cfg.get("sharding") or {}).get("num_devices", 0) or 0) or num_devices
    if num_devices and mesh > num_devices:
        raise ConfigError(f"--config.sharding.num_devices={mesh} but only {num_devices} "
                          "devices are visible")
    for name in ("train.batch_size", "eval.batch_size"):
        section, _, leaf = name.partition(".")
        value = (cfg.get(section) or {}).get(leaf, None)
        if value is None or (section == "eval" and value == 0):
            continue  # eval.batch_size 0/None = the train batch size
        if int(value) <= 0:
            raise ConfigError(f"--config.{name}={value}: must be a positive number")
        if mesh and int(value) % mesh:
            raise ConfigError(f"--config.{name}={value} is not divisible by the {mesh} devices;"
                              f" use a multiple of {mesh} (e.g. {max(mesh, value // mesh * mesh)})")


def _check_finite(d: Any, key: str = "") -> None:
    """Non-finite floats have no literal; say which field instead of writing a broken file."""
    if isinstance(d, dict):
        for k, v in d.items():
            _check_finite(v, f"{key}.{k}" if key else k)
    elif isinstance(d, float) and not math.isfinite(d):
        raise ConfigError(f"config field {key}={d}: non-finite values cannot be written to "
                          "a resolved config file")
