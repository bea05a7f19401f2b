"""Shared fixtures and oracles for the tests: asmk 0.1.1 runs beside jasmk on the same data."""

import numpy as np
import pytest


def load_experiment(name):
    """Import ``experiments/<name>.py`` as a module (the experiments are scripts, not a package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def asmk_params(*, size, binary=True, use_idf=False, ma_build=1, ma_query=5, alpha=3.0, threshold=0.0, topk=None):
    """asmk 0.1.1 params dict (CPU index)."""
    return {
        "index": {"gpu_id": None},
        "train_codebook": {"codebook": {"size": size}},
        "build_ivf": {"kernel": {"binary": binary}, "ivf": {"use_idf": use_idf},
                      "quantize": {"multiple_assignment": ma_build}, "aggregate": {}},
        "query_ivf": {"quantize": {"multiple_assignment": ma_query}, "aggregate": {}, "search": {"topk": topk},
                      "similarity": {"similarity_threshold": threshold, "alpha": alpha}},
    }


def asmk_with_centroids(params, centroids):
    """An asmk ASMKMethod whose codebook holds exactly ``centroids``."""
    from asmk import asmk_method
    from asmk import codebook as cdb_pkg
    from asmk import index as idx_pkg

    cdb = cdb_pkg.Codebook(idx_pkg.initialize_index(None), size=params["train_codebook"]["codebook"]["size"])
    cdb.index(np.ascontiguousarray(centroids, dtype=np.float32))
    return asmk_method.ASMKMethod(params, {}, codebook=cdb)


def dense_from_ranks(ranks, scores, n_cols):
    """Dense [n_query, n_cols] matrix from ranked (ranks, scores), as MASt3R's Retriever does."""
    dense = np.full((ranks.shape[0], n_cols), np.nan)
    dense[np.arange(ranks.shape[0])[:, None], ranks] = scores
    return dense


def assert_same_ranking(ranks, scores, ref_ranks, ref_scores, *, atol=1e-5, tie_tol=1e-6):
    """Ranks/scores agree with the reference: scores position by position within ``atol``; rank lists are
    permutations and, where they differ, the reference itself scores both images within ``tie_tol``
    (a tie, whose order asmk leaves to numpy's unstable argsort)."""
    ranks, ref_ranks = np.asarray(ranks), np.asarray(ref_ranks)
    assert ranks.shape == ref_ranks.shape, (ranks.shape, ref_ranks.shape)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=atol)
    n_cols = int(max(ranks.max(), ref_ranks.max())) + 1
    for q in range(ranks.shape[0]):
        assert len(set(ranks[q].tolist())) == ranks.shape[1], f"query {q}: repeated ranks"
    ref_dense = dense_from_ranks(ref_ranks, ref_scores, n_cols)
    mismatch = ranks != ref_ranks
    if mismatch.any():
        q_idx, pos = np.nonzero(mismatch)
        ours_in_ref = ref_dense[q_idx, ranks[q_idx, pos]]
        gap = np.abs(ours_in_ref - ref_scores[q_idx, pos])
        assert np.all(gap <= tie_tol), (
            f"{mismatch.sum()} rank positions differ and not all are ties: max gap {np.nanmax(gap)}, "
            f"nan={np.isnan(gap).sum()}"
        )


def clustered_data(rng, *, n_images, per_image, dim, n_scenes=None, noise=0.3):
    """Descriptors of images that share scenes: images of one scene hold noisy copies of its points."""
    n_scenes = n_scenes or max(2, n_images // 3)
    scene_pts = rng.standard_normal((n_scenes, per_image * 2, dim)).astype(np.float32)
    feats, ids = [], []
    for i in range(n_images):
        s = i % n_scenes
        pick = rng.choice(per_image * 2, per_image, replace=False)
        feats.append(scene_pts[s, pick] + noise * rng.standard_normal((per_image, dim)).astype(np.float32))
        ids.append(np.full(per_image, i))
    return np.concatenate(feats).astype(np.float32), np.concatenate(ids)


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
