"""The one table of similarity methods (similarity.REGISTRY) and what derives from it."""
import numpy as np
import pytest

from medtransfer_jax.analysis import covariance, layer_map, plots, similarity as sim, streaming


def test_registry_drives_every_method_list():
    assert sim.METHODS == tuple(sim.REGISTRY)
    assert layer_map.MAP_METHODS == tuple(m for m, s in sim.REGISTRY.items() if s.maps)
    # what the registry says streams really has an accumulator, and nothing else does
    for m in sim.METHODS:
        if sim.REGISTRY[m].streaming:
            streaming.StreamingSimilarity({"l": (3, 3)}, methods=(m,))
        else:
            with pytest.raises(ValueError, match="cannot be streamed"):
                streaming.StreamingSimilarity({"l": (3, 3)}, methods=(m,))
    # every covariance-form method is declared streamable and mappable
    assert set(covariance.COVARIANCE_METHODS) <= set(sim.STREAMING_METHODS)
    assert set(covariance.COVARIANCE_METHODS) <= set(sim.MAP_METHODS)
    assert sim.CCA_FAMILY == ("mean_cca", "paper_cca", "svcca", "pwcca")


def test_kernels_and_labels_come_from_the_table():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 5))
    Y = X @ rng.normal(size=(5, 5))  # an invertible linear map of X
    for m, fn in sim.KERNELS.items():
        v = float(fn(X, Y))
        assert v == pytest.approx(float(sim.similarity(X, Y, m)), abs=1e-6), m
        if m in sim.CCA_FAMILY:
            assert v == pytest.approx(1.0, abs=1e-4), m  # CCA is invariant to linear maps
    assert sim.label("svcca") == "SVCCA" and sim.label("new_thing") == "new thing"
    with pytest.raises(ValueError, match=r"\['rbf_cka'\] cannot be mapped"):
        sim.check_methods(["rbf_cka"], need="maps")
    with pytest.raises(ValueError, match="nope"):
        sim.check_methods(["nope"])
    assert plots.sim is sim  # plots label axes through the registry
