"""A study's ``analysis.*`` settings: each one once, with its default and its choices.

Why one place: the stages used to read each setting with its own ``.get(..., default)``,
so a study config that did not spell a setting out could not have it set from the
command line (``--config.analysis.fold_plot=box`` was "no such field"), and a misspelled
value (``auc_metric=auc_kears``) surfaced as a traceback after every run had trained.
Every study config starts from :func:`analysis_defaults`; the stages read through
:func:`get`, which falls back to the default for configs written without it and raises a
``ValueError`` naming ``analysis.<field>`` and its choices, which pre-flight lists before
anything runs (:func:`problems`).

``analysis.cca`` and ``analysis.layer_maps`` are not here: a study has them or not (their
presence turns the representations stage and the layer maps on), and each names its own
fields (``studies/runner.py``).
"""
from __future__ import annotations

from typing import Any, List

import ml_collections

#: runs.csv's ``test.<metric>`` that every table, test and figure of a study reads:
#: sklearn's one-vs-rest macro AUC, micro AUC, Keras' ``AUC()`` (Source Matters and the
#: Sep-2023 Revisiting scripts), one-vs-rest weighted (the Feb-2023 scripts).
AUC_METRICS = ("auc", "auc_micro", "auc_keras", "auc_ovr_weighted")
#: The confounded runs' test sets: artefact as in training, none, reversed.
TEST_SETS = ("iid", "clean", "ood")

#: field -> (default, choices (a tuple, or 'int >= 1'), or None, what it sets); a tuple
#: default is a list option (tuples, not lists: config_flags overrides only tuples)
OPTIONS = {
    "auc_metric": ("auc", AUC_METRICS, "the AUC every table and figure reads"),
    "bootstrap": (1000, "int >= 1", "resamples of each run's bootstrap CI over its test "
                                    "images"),
    "fold_plot": ("mean_sd", ("mean_sd", "box"),
                  "the AUC and prediction-similarity figures: bars of mean ± sd, or the "
                  "Revisiting paper's boxplots of the folds"),
    "robustness_test_sets": (TEST_SETS, TEST_SETS,
                             "the test sets on which sources are compared by permutation "
                             "test (Source Matters: ('ood',))"),
    "robustness_errorbar": ("sd", ("sd", "ci95"),
                            "the robustness figure's bars: sample sd over folds, or the "
                            "95 % bootstrap CI of the mean (Source Matters' figures)"),
    "compare_sources": ((), None, "the sources the permutation tests compare; [] = every "
                                  "source but random"),
    "filters.basis": ("study", ("study", "pair"),
                      "3x3 filter drifts in one PCA basis over every model compared "
                      "(CNN-Filter-DB), or each (pre, fine-tuned) pair its own"),
    "filters.groups": (None, None, "filters-only studies: {group: [weights dirs]}"),
}


def analysis_defaults() -> ml_collections.ConfigDict:
    """``config.analysis`` with every option at its default (a study config adds its own
    ``cca`` / ``layer_maps`` sections and changes what its paper did differently)."""
    c = ml_collections.ConfigDict()
    for name, (default, _, _) in OPTIONS.items():
        node = c
        *parents, leaf = name.split(".")
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        node[leaf] = default
    return c


def flag_ready(analysis: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``analysis`` with every list turned into a tuple, nested ones too: config_flags can
    override a tuple field from the command line (``--config.analysis.cca.methods=
    "('linear_cka',)"``) but refuses a list one. A study config ends with it."""
    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, (list, tuple)) else v
    for key, value in analysis.items():
        if isinstance(value, ml_collections.ConfigDict):
            flag_ready(value)
        elif isinstance(value, list):
            del analysis[key]          # a list field only takes lists: make it anew
            analysis[key] = tup(value)
    return analysis


def get(config, name: str) -> Any:
    """``config.analysis.<name>`` (dotted, e.g. 'filters.basis'), its default where the
    config has none; a value outside the choices is a ValueError naming the field."""
    default, choices, what = OPTIONS[name]
    node = config.get("analysis", None) if hasattr(config, "get") else None
    for part in name.split("."):
        node = node.get(part, None) if hasattr(node, "get") else None
    value = default if node is None else node
    many = isinstance(default, tuple)
    if many:
        value = list(value)
    if choices is None:
        return value
    if choices == "int >= 1":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"analysis.{name}={value!r}; use an integer >= 1 ({what})")
        return value
    values = value if many else [value]
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise ValueError(f"analysis.{name}={value!r}" + (f": {bad} unknown" if bad and many
                                                          else "")
                         + f"; use {'some' if many else 'one'} of {list(choices)} ({what})")
    return value


def problems(config) -> List[str]:
    """Every analysis option the config sets outside its choices, one line each."""
    out = []
    for name in OPTIONS:
        try:
            get(config, name)
        except ValueError as e:
            out.append(str(e))
    return out
