"""The module paths of jasmk 0.1 keep importing (for one minor version) as aliases that warn with the new place."""

import importlib
import sys

import pytest

MOVED = {
    "jasmk.aggregate": "jasmk.core.aggregate", "jasmk.codebook": "jasmk.core.codebook", "jasmk.ivf": "jasmk.core.ivf",
    "jasmk.score": "jasmk.core.score", "jasmk.engine": "jasmk.core.engine", "jasmk.cpu_kernel": "jasmk.core.cpu_kernel",
    "jasmk.memory": "jasmk.core.memory", "jasmk.validate": "jasmk.core.validate", "jasmk.runtime": "jasmk.core.runtime",
    "jasmk.atomic": "jasmk.storage.atomic", "jasmk.safepickle": "jasmk.storage.safepickle",
    "jasmk.checkpoint": "jasmk.storage.checkpoint", "jasmk.whiten": "jasmk.head.whiten",
    "jasmk.select": "jasmk.head.selection", "jasmk.train": "jasmk.head.train", "jasmk.eval": "jasmk.evaluation",
}


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_module_path_is_the_new_module_and_warns(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}") as caught:
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert caught[0].filename == __file__  # attributed to the line that imported it, not to jasmk
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        assert importlib.import_module(old) is module  # once: a second import is silent


def test_names_the_0_1_readme_used_still_resolve():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jasmk import checkpoint, codebook, eval, ivf, runtime  # noqa: A004
        from jasmk.cli import configure_logging
        from jasmk.head import HeadConfig, load_mast3r_checkpoint
        from jasmk.shard import ShardedIndex, build_sharded

    for fn in (checkpoint.save_index, checkpoint.load_asmk_ivf, ivf.empty, codebook.faiss_info, eval.evaluate_revisited,
               runtime.share_gpu_with_torch, configure_logging, load_mast3r_checkpoint, build_sharded):
        assert callable(fn)
    assert isinstance(HeadConfig, type) and isinstance(ShardedIndex, type)


def test_moved_functions_forward_and_warn():
    from jasmk import shard
    from jasmk.storage import checkpoint

    for name in ("save_sharded_index", "load_sharded_index"):
        with pytest.warns(DeprecationWarning, match=f"moved to jasmk.shard.{name}"):
            assert getattr(checkpoint, name) is getattr(shard, name)
    from jasmk import cli, logs

    with pytest.warns(DeprecationWarning, match="jasmk.logs.configure_logging"):
        assert cli.configure_logging is logs.configure_logging


def test_engine_keyword_is_now_kernel_and_warns(small_data):
    import numpy as np

    import jasmk

    feats, ids, centroids = small_data
    index = jasmk.build_index(feats, ids, codebook=centroids)
    q = ids < 3
    want = jasmk.query(index, feats[q], ids[q], kernel="dense", topk=5)
    with pytest.warns(DeprecationWarning, match="engine= is now called kernel=") as caught:
        got = jasmk.query(index, feats[q], ids[q], engine="dense", topk=5)
    assert caught[0].filename == __file__
    np.testing.assert_array_equal(got.ranks, want.ranks)
    with pytest.warns(DeprecationWarning):
        s = jasmk.score_matrix(index, feats[q], ids[q], engine="sparse-xla")
    np.testing.assert_allclose(s, jasmk.score_matrix(index, feats[q], ids[q], kernel="sparse-xla"))
    with pytest.raises(ValueError, match="kernel must be one of"):
        jasmk.query(index, feats[q], ids[q], kernel="fast")
