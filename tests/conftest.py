"""Shared fixtures and oracles for the tests: asmk 0.1.1 runs beside jasmk on the same data."""

import os

import numpy as np
import pytest
from helpers import clustered_data

# the CLI, called inside this process by some tests, would otherwise turn on JAX's persistent compilation cache
# for the whole session (and the compilation counts of later tests would count cache hits as nothing)
os.environ["JASMK_XLA_CACHE"] = "0"


@pytest.fixture(scope="session")
def small_data():
    """(feats [N, 32], ids [N], centroids [64, 32]) with shared scene structure; centroids from jasmk's k-means."""
    import jasmk

    rng = np.random.default_rng(7)
    feats, ids = clustered_data(rng, n_images=24, per_image=60, dim=32)
    cb = jasmk.train_codebook(feats, size=64)
    return feats, ids, np.asarray(cb.centroids)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU that JAX can use (skipped elsewhere)")
    config.addinivalue_line("markers", "slow: runs a subprocess, a notebook or several processes "
                                       "(a quick run leaves them out: -m 'not slow')")
