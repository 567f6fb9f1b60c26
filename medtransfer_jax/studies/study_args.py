"""The argument of a study config: ``--config=configs/study_revisiting.py:targets=breast,thyroid,folds=0,1``.

``key=value`` items separated by commas; a bare item continues the previous key's list,
so ``targets=breast,thyroid,folds=0,1`` is ``{'targets': ['breast', 'thyroid'], 'folds':
['0', '1']}``. Unknown keys are an error naming the known ones and an example the config
accepts, so a typo never runs the default grid for hours.

A study config records which file it is and which of its arguments set what
(:func:`describe` -> ``config.args``; a target's ``from_args``, a source's
``study_arg``), so the pre-flight's hints name the config in use and its real argument
(``configs/study_source_matters.py:nih=DIR``), not another study's.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional


def parse(arg: Optional[str], known: Mapping[str, object], config: str,
          example: Optional[str] = None) -> Dict[str, List[str]]:
    """Returns {key: [values]} for the keys given; raises ValueError on unknown keys.

    ``example``: an argument ``config`` accepts, shown after the known keys (default
    one built from the first known key)."""
    out: Dict[str, List[str]] = {}
    key = None
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            key, value = item.split("=", 1)
            if key not in known:
                raise ValueError(f"{config}: unknown argument {key!r}; known: "
                                 f"{', '.join(sorted(known))} (e.g. {config}:"
                                 f"{example or default_example(known)})")
            out[key] = [value] if value else []
        elif key is None:
            raise ValueError(f"{config}: argument {item!r} has no key; write key=value.")
        else:
            out[key].append(item)
    return out


def default_example(known: Mapping[str, object]) -> str:
    """``key=...`` for the first known key: an example that at least parses."""
    return f"{sorted(known)[0]}=..." if known else ""


def one(args: Mapping[str, List[str]], key: str, default: str) -> str:
    """The single value of ``key`` (user paths expanded), or ``default``."""
    v = args.get(key)
    return os.path.expanduser(v[0]) if v else os.path.expanduser(default)


def describe(config: str, known: Mapping[str, object], example: str) -> dict:
    """``config.args`` of a study config: its file, known arguments and an example."""
    return dict(config=config, known=sorted(known), example=example)


def usage(info: Optional[Mapping], arg: str, value: str = "DIR") -> Optional[str]:
    """``configs/study_revisiting.py:data=DIR with DIR/breast in it`` for the
    argument ``arg`` (``name`` or ``name/sub``: the config reads ``VALUE/sub``) of the
    config ``info`` (:func:`describe`), or None when either is unknown."""
    if not info or not arg:
        return None
    name, _, sub = arg.partition("/")
    text = f"{info['config']}:{name}={value}"
    return text + (f" with {value}/{sub} in it" if sub else "")
