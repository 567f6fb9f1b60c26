"""configs/study_options: each analysis option once, its default within its choices, read
the same from a config that spells it out and from one that does not."""
import ml_collections
import pytest

from medtransfer_jax.configs import study_options
from medtransfer_jax.studies import analyses


def test_defaults_are_valid_and_a_config_without_them_reads_the_same():
    full = ml_collections.ConfigDict(dict(analysis=study_options.analysis_defaults()))
    bare = ml_collections.ConfigDict(dict(analysis=ml_collections.ConfigDict()))
    assert study_options.problems(full) == [] == study_options.problems(bare)
    for name in study_options.OPTIONS:
        got = study_options.get(full, name)
        assert got == study_options.get(bare, name) == study_options.get({}, name)
    assert study_options.get(full, "filters.basis") == "study"


def test_every_auc_metric_has_its_bootstrap_function():
    assert set(analyses.AUC_FUNCTIONS) == set(study_options.AUC_METRICS)


@pytest.mark.parametrize("name,value,expect", [
    ("auc_metric", "auc_kears", "analysis.auc_metric='auc_kears'; use one of ['auc',"),
    ("robustness_test_sets", ["ood", "reversed"],
     "analysis.robustness_test_sets=['ood', 'reversed']: ['reversed'] unknown; use some of"),
    ("robustness_test_sets", [], "analysis.robustness_test_sets=[]; use some of"),
    ("filters.basis", "global", "analysis.filters.basis='global'; use one of ['study', 'pair']"),
])
def test_a_value_outside_the_choices_names_the_field_and_the_choices(name, value, expect):
    c = ml_collections.ConfigDict(dict(analysis=study_options.analysis_defaults()))
    *parents, leaf = name.split(".")
    node = c.analysis
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=None) as e:
        study_options.get(c, name)
    assert expect in str(e.value)
    assert [m for m in study_options.problems(c) if expect in m]
