"""The argument of a study config: ``--config=configs/study_revisiting.py:targets=breast,thyroid,folds=0,1``.

``key=value`` items separated by commas; a bare item continues the previous key's list,
so ``targets=breast,thyroid,folds=0,1`` is ``{'targets': ['breast', 'thyroid'], 'folds':
['0', '1']}``. Unknown keys are an error naming the known ones, so a typo never runs the
default grid for hours.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional


def parse(arg: Optional[str], known: Mapping[str, object], config: str) -> Dict[str, List[str]]:
    """Returns {key: [values]} for the keys given; raises ValueError on unknown keys."""
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
                                 f"{', '.join(sorted(known))} (e.g. {config}:targets=breast,"
                                 "thyroid,folds=0,1)")
            out[key] = [value] if value else []
        elif key is None:
            raise ValueError(f"{config}: argument {item!r} has no key; write key=value.")
        else:
            out[key].append(item)
    return out


def one(args: Mapping[str, List[str]], key: str, default: str) -> str:
    """The single value of ``key`` (user paths expanded), or ``default``."""
    v = args.get(key)
    return os.path.expanduser(v[0]) if v else os.path.expanduser(default)

