"""Retrieval head: whitening, selection, Flax head against a torch/numpy evaluation of a MASt3R-format checkpoint,
Orbax round trip, optax training."""

import argparse
import os
import subprocess
import sys
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import Hostile, count_compilations, make_mast3r_checkpoint, reference_whitening, torch_reference

from jasmk import head
from jasmk.head import selection as select
from jasmk.head import train, whiten
from jasmk.storage import checkpoint


@pytest.mark.parametrize("s", [1.0, 0.5])
def test_pca_whitening_matches_reference(s):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12)) + 3.0).astype(np.float32)
    m, p = whiten.learn_pca_whitening(x, shrinkage=s)
    rm, rp = reference_whitening(x.astype(np.float64), s)
    np.testing.assert_allclose(m, rm, rtol=1e-12)
    # eigenvector signs are arbitrary: compare sign-free products and |P|
    np.testing.assert_allclose(p @ p.T, rp @ rp.T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.abs(p), np.abs(rp), rtol=1e-6, atol=1e-9)
    w = np.asarray(whiten.whiten(jnp.asarray(x), jnp.asarray(m), jnp.asarray(p)))
    if s == 1.0:
        np.testing.assert_allclose(np.cov(w.T, bias=True), np.eye(12), atol=1e-4)
    with pytest.raises(ValueError, match="NaN"):
        whiten.learn_pca_whitening(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        whiten.learn_pca_whitening(np.ones((1, 2)))


def test_selection_and_spoc_match_numpy():
    rng = np.random.default_rng(1)
    feat = rng.standard_normal((3, 20, 5)).astype(np.float32)
    attn = np.linalg.norm(feat, axis=-1)
    for nfeat, k in [(7, 7), (100, 20), (-0.5, 10), (-1, 20)]:
        f, a, idx = select.how_select_local(jnp.asarray(feat), jnp.asarray(attn), nfeat=nfeat)
        ref_idx = np.argsort(-attn, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(np.asarray(idx), ref_idx)
        np.testing.assert_allclose(np.asarray(f), np.take_along_axis(feat, ref_idx[..., None], 1), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(a), np.take_along_axis(attn, ref_idx, 1), rtol=1e-6)
    g = np.asarray(select.weighted_spoc(jnp.asarray(feat), jnp.asarray(attn)))
    v = (feat * attn[..., None]).sum(1)
    np.testing.assert_allclose(g, v / np.linalg.norm(v, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    # vmappable: per-image calls equal the batched call
    per = jax.vmap(lambda f_, a_: select.weighted_spoc(f_, a_))(jnp.asarray(feat), jnp.asarray(attn))
    np.testing.assert_allclose(np.asarray(per), g, rtol=1e-6)
    for bad in (-1.5, "x", True, float("nan")):
        with pytest.raises(ValueError):
            select.resolve_nfeat(bad, 10)
    assert select.resolve_nfeat is head.resolve_nfeat  # one rule, MASt3R's: 0 < nfeat < 1 keeps int(nfeat) = 0
    assert select.resolve_nfeat(0.5, 10) == 0


@pytest.mark.parametrize("hdims,residual,prewhiten,postwhiten,nfeat", [
    ("32_24", False, 1, 0, 10),
    ("16_16", True, None, None, -0.25),
    ("", False, 1, None, 5),
    ("", False, None, -1, 7),       # no prewhitening, no projector: the dim comes from postwhiten.m
    ("24", False, None, 0, 0.5),    # 0 < nfeat < 1: MASt3R keeps int(nfeat) = 0 features
    ("24_16", False, None, None, -0.01),  # int(0.01 * 40) = 0 features
    ("24_16", False, None, 2, 2.7),  # int(2.7) = 2
])
def test_mast3r_checkpoint_import_matches_torch(tmp_path, hdims, residual, prewhiten, postwhiten, nfeat):
    c = 16
    path = str(tmp_path / "retrieval.pth")
    projector, whiteners = make_mast3r_checkpoint(path, c=c, hdims=hdims, residual=residual, prewhiten=prewhiten,
                                                  postwhiten=postwhiten, nfeat=nfeat)
    config, variables, info = head.load_mast3r_checkpoint(path)
    assert info == {"imsize": 512, "nclusters": 1024}
    assert config.backbone_dim == c and config.nfeat == nfeat
    x = np.random.default_rng(3).standard_normal((2, 40, c)).astype(np.float32)
    glob, top_feat, top_attn, top_idx = torch_reference(x, projector, whiteners, residual=residual, nfeat=nfeat)
    np.testing.assert_allclose(np.asarray(head.extract_global(variables, config, x)), glob, atol=1e-5)
    f, a, idx = head.extract_local(variables, config, x)
    assert idx.dtype == np.int64 == top_idx.dtype
    assert np.asarray(f).shape == top_feat.shape and np.asarray(a).shape == top_attn.shape
    np.testing.assert_array_equal(idx, top_idx)
    np.testing.assert_allclose(np.asarray(f), top_feat, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a), top_attn, atol=1e-5, rtol=1e-5)
    # features already on the device are checked there and give the same result
    f2, _, idx2 = head.extract_local(variables, config, jnp.asarray(x))
    np.testing.assert_array_equal(idx2, top_idx)
    np.testing.assert_array_equal(np.asarray(f2), np.asarray(f))


def test_checkpoint_without_weights_needs_the_backbone_dim(tmp_path):
    """hdims '' and no whitening: MASt3R's head is the identity and takes C from the backbone."""
    path = str(tmp_path / "identity.pth")
    make_mast3r_checkpoint(path, c=12, hdims="", residual=False, prewhiten=None, postwhiten=None, nfeat=-0.5)
    with pytest.raises(ValueError, match="backbone_dim="):
        head.load_mast3r_checkpoint(path)
    config, variables, _ = head.load_mast3r_checkpoint(path, backbone_dim=12)
    assert config.backbone_dim == 12 and config.dim == 12 and config.hdims == ()
    x = np.random.default_rng(0).standard_normal((3, 10, 12)).astype(np.float32)
    glob, top_feat, top_attn, top_idx = torch_reference(x, __import__("torch").nn.Sequential(), {}, residual=False,
                                                        nfeat=-0.5)
    f, a, idx = head.extract_local(variables, config, x)
    np.testing.assert_array_equal(idx, top_idx)
    np.testing.assert_allclose(np.asarray(f), top_feat, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(head.extract_global(variables, config, x)), glob, atol=1e-6)
    # a dim the weights contradict is refused
    path2 = str(tmp_path / "pre.pth")
    make_mast3r_checkpoint(path2, c=12, hdims="", residual=False, prewhiten=1, postwhiten=None, nfeat=3)
    with pytest.raises(ValueError, match="12-channel"):
        head.load_mast3r_checkpoint(path2, backbone_dim=10)


def test_mast3r_argument_rules(tmp_path):
    # MASt3R asserts a projector for a post-whitening other than -1, and nfeat >= -1
    path = str(tmp_path / "bad.pth")
    make_mast3r_checkpoint(path, c=8, hdims="", residual=False, prewhiten=1, postwhiten=0, nfeat=3)
    with pytest.raises(ValueError, match="postwhiten=0 needs a projector"):
        head.load_mast3r_checkpoint(path)
    path = str(tmp_path / "bad2.pth")
    make_mast3r_checkpoint(path, c=8, hdims="8", residual=False, prewhiten=None, postwhiten=None, nfeat=-1.5)
    with pytest.raises(ValueError, match="fractional nfeat"):
        head.load_mast3r_checkpoint(path)
    for bad in (float("nan"), float("inf"), "x", True, None):
        with pytest.raises(ValueError):
            head.resolve_nfeat(bad, 10)
    # the rule itself against MASt3R's, on a grid
    for nfeat in (-1, -0.999, -0.5, -0.05, -0.01, 0, 0.2, 0.99, 1, 1.5, 3, 7.9, 300):
        for n in (0, 1, 7, 40):
            expected = min(int(-nfeat * n) if nfeat < 0 else int(nfeat), n)
            assert head.resolve_nfeat(nfeat, n) == expected, (nfeat, n)


def test_codebook_path_follows_mast3r(tmp_path):
    name = "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric_retrieval_trainingfree.pth"
    ckpt = tmp_path / name
    ckpt.write_bytes(b"")
    # MASt3R's rule, re-derived: all '_' parts of the file name but the last, then '_codebook.pkl'
    expected = os.path.join(str(tmp_path), "_".join(name.split("_")[:-1]) + "_codebook.pkl")
    assert expected.endswith("metric_retrieval_codebook.pkl")
    with pytest.raises(ValueError, match="metric_retrieval_codebook.pkl"):
        head.mast3r_codebook_path(ckpt)
    open(expected, "wb").close()
    assert head.mast3r_codebook_path(ckpt) == expected
    assert head.mast3r_codebook_path(str(ckpt)) == expected
    # a name without '_' keeps nothing of it, as in MASt3R
    (tmp_path / "_codebook.pkl").write_bytes(b"")
    assert head.mast3r_codebook_path(tmp_path / "model.pth") == str(tmp_path / "_codebook.pkl")
    with pytest.raises(ValueError, match="no codebook"):
        head.mast3r_codebook_path(tmp_path / "sub" / "a_b.pth")


def _dot_precisions(jaxpr):
    """The precision of every dot_general in a jaxpr and all the jaxprs nested in it (jit, scan, cond...)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (list, tuple)) else (value,)):
                if hasattr(sub, "eqns"):
                    found += _dot_precisions(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    found += _dot_precisions(sub.jaxpr)
    return found


def _all_highest(precisions):
    def is_highest(p):
        if isinstance(p, (tuple, list)):
            return len(p) > 0 and all(is_highest(q) for q in p)
        return p == jax.lax.Precision.HIGHEST

    return all(is_highest(p) for p in precisions)


def test_every_head_matmul_runs_at_highest_precision():
    config = head.HeadConfig(backbone_dim=8, hdims=(12, 10, 6), prewhiten=True, postwhiten=True, nfeat=4)
    variables = head.init_head(config, seed=0)
    x = jnp.ones((2, 9, 8), jnp.float32)
    model = head.RetrievalHead(config)
    for method in (head.RetrievalHead.forward_local, head.RetrievalHead.forward_global):
        closed = jax.make_jaxpr(lambda v, a: model.apply(v, a, method=method))(variables, x)
        precisions = _dot_precisions(closed.jaxpr)
        assert len(precisions) == 5, precisions  # 3 Dense layers + 2 whitenings
        assert _all_highest(precisions), precisions
    # the walker sees a dot without the precision: a Dense left at the default fails the check
    w = jnp.ones((8, 4))
    sloppy = jax.make_jaxpr(lambda a: jnp.tanh(model.apply(variables, a, method=head.RetrievalHead.forward_global))
                            @ jnp.ones((6, 3)))(x)
    assert not _all_highest(_dot_precisions(sloppy.jaxpr))
    import flax.linen as nn

    default_dense = nn.Dense(4)
    p = default_dense.init(jax.random.PRNGKey(0), x)
    assert not _all_highest(_dot_precisions(jax.make_jaxpr(lambda a: default_dense.apply(p, a))(x).jaxpr))
    assert not _all_highest(_dot_precisions(jax.make_jaxpr(lambda a: jax.jit(lambda b: b @ w)(a))(x).jaxpr))


def test_head_errors_and_orbax_round_trip(tmp_path):
    config = head.HeadConfig(backbone_dim=8, hdims=(12, 6), prewhiten=True, postwhiten=True, nfeat=4)
    variables = head.init_head(config, seed=1)
    x = np.random.default_rng(0).standard_normal((2, 9, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="channels|must be"):
        head.extract_global(variables, config, x[..., :5])
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        head.extract_local(variables, config, bad)
    with pytest.raises(ValueError, match="residual"):
        head.HeadConfig(backbone_dim=8, hdims=(4,), residual=True)
    with pytest.raises(ValueError, match="featweights"):
        head.HeadConfig(backbone_dim=8, featweights="softmax")
    head.save_head(tmp_path / "head", config, variables)
    config2, variables2 = head.load_head(tmp_path / "head")
    assert config2 == config
    np.testing.assert_array_equal(np.asarray(head.extract_global(variables2, config2, x)),
                                  np.asarray(head.extract_global(variables, config, x)))
    with pytest.raises(ValueError, match="not a retrieval head"):
        from jasmk.storage import checkpoint

        checkpoint.save_tree(tmp_path / "other", {"a": np.zeros(2)}, meta={"kind": "codebook"})
        head.load_head(tmp_path / "other")


def synthetic_task(rng, *, n_classes=8, per_class=6, n_local=12, c=16, signal_dims=4):
    """Images of a class share landmark vectors in a few dims; the other dims carry strong nuisance noise."""
    protos = rng.standard_normal((n_classes, 4, signal_dims)).astype(np.float32) * 2.0
    feats, labels = [], []
    for k in range(n_classes):
        for _ in range(per_class):
            sig = protos[k, rng.integers(0, 4, n_local)] + 0.3 * rng.standard_normal((n_local, signal_dims))
            noise = 2.5 * rng.standard_normal((n_local, c - signal_dims))
            feats.append(np.concatenate([sig, noise], axis=1))
            labels.append(k)
    return np.asarray(feats, np.float32), np.asarray(labels)


def mean_ap(desc, labels):
    sims = desc @ desc.T
    aps = []
    for q in range(len(desc)):
        order = [i for i in np.argsort(-sims[q], kind="stable") if i != q]
        rel = labels[order] == labels[q]
        hits = np.cumsum(rel)
        aps.append((hits[rel] / (np.flatnonzero(rel) + 1)).mean())
    return float(np.mean(aps))


def test_training_reduces_loss_and_improves_map():
    rng = np.random.default_rng(0)
    feats, labels = synthetic_task(rng)
    config = head.HeadConfig(backbone_dim=16, hdims=(32, 16), nfeat=12)
    variables = head.init_head(config, seed=0)
    opt = optax.adam(1e-2)
    params, opt_state = variables["params"], opt.init(variables["params"])
    step = train.make_train_step(config, opt, margin=0.7)
    by_class = [np.flatnonzero(labels == k) for k in range(labels.max() + 1)]

    def batch():
        q, p, n = [], [], []
        for _ in range(16):
            k = rng.integers(len(by_class))
            a, b = rng.choice(by_class[k], 2, replace=False)
            negs = rng.choice(np.flatnonzero(labels != k), 4, replace=False)
            q.append(feats[a]), p.append(feats[b]), n.append(feats[negs])
        return jnp.asarray(np.stack(q)), jnp.asarray(np.stack(p)), jnp.asarray(np.stack(n))

    def evaluate(prm):
        return mean_ap(np.asarray(head.extract_global({"params": prm}, config, feats)), labels)

    map_before = evaluate(params)
    losses = []
    for _ in range(150):
        params, opt_state, loss = step(params, opt_state, {}, *batch())
        losses.append(float(loss))
    map_after = evaluate(params)
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])
    assert map_after > map_before + 0.1, (map_before, map_after)


def test_relearn_whitening_matches_learning_on_projected_features():
    rng = np.random.default_rng(2)
    config = head.HeadConfig(backbone_dim=8, hdims=(10, 6), prewhiten=True, postwhiten=True, nfeat=4)
    variables = head.init_head(config, seed=3)
    images = [rng.standard_normal((30, 8)).astype(np.float32) * 2 + 1 for _ in range(5)]
    v2 = train.relearn_whitening(variables, config, images, which="pre", max_nfeat_per_image=20)
    top = [im[np.argsort(-np.linalg.norm(im, axis=1), kind="stable")[:20]] for im in images]
    m, p = whiten.learn_pca_whitening(np.concatenate(top))
    np.testing.assert_allclose(np.asarray(v2["whitening"]["prewhiten"]["m"]), m, rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.asarray(v2["whitening"]["prewhiten"]["p"])), np.abs(p), rtol=1e-4, atol=1e-6)
    v3 = train.relearn_whitening(v2, config, images, which="post")
    proj = np.concatenate([np.asarray(head.RetrievalHead(config).apply(v2, jnp.asarray(im),
                                                                     method=lambda mdl, x: mdl.project(x)[1]))
                           for im in images])
    out = np.asarray(head.RetrievalHead(config).apply(v3, jnp.asarray(np.concatenate(images)),
                                                      method=head.RetrievalHead.features_and_attention)[0])
    np.testing.assert_allclose(np.cov(out.T, bias=True), np.eye(6), atol=1e-3)
    assert proj.shape == (150, 6)
    with pytest.raises(ValueError, match="no post"):
        train.relearn_whitening(variables, head.HeadConfig(backbone_dim=8, hdims=(4,)), images, which="post")


# ---------------------------------------------------------------------------------------------------------
# float64 whitening (MASt3R's precision) without global x64


def _f64_ops(hlo_text):
    """``(function, op)`` of every StableHLO op with a float64 operand or result, and the float64 dot_generals."""
    ops, func = [], None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("func.func"):
            func = stripped.split("@", 1)[1].split("(", 1)[0]
        elif "f64" in stripped and "stablehlo." in stripped:
            ops.append((func, stripped.split("stablehlo.", 1)[1].split()[0]))
    return ops


def test_lowered_head_has_a_float64_dot_for_each_whitening_and_nothing_else_in_float64():
    config = head.HeadConfig(backbone_dim=8, hdims=(12, 6), prewhiten=True, postwhiten=True, nfeat=4)
    variables = head.device_variables(head.init_head(config, seed=0))
    assert not jax.config.jax_enable_x64
    model = head.RetrievalHead(config)
    x = jnp.ones((2, 9, 8), jnp.float32)
    for method in (head.RetrievalHead.forward_local, head.RetrievalHead.forward_global):
        text = jax.jit(lambda v, a: model.apply(v, a, method=method)).lower(variables, x).as_text()
        ops = _f64_ops(text)
        assert all(f.startswith("_whiten_float64") for f, _ in ops), ops
        assert {op for _, op in ops} <= {"convert", "reshape", "broadcast_in_dim", "subtract", "dot_general"}, ops
        assert sum(op == "dot_general" for _, op in ops) == 2  # pre- and post-whitening
        dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        assert len(dots) == 4 and all("precision = [HIGHEST, HIGHEST]" in d for d in dots)
        assert sum("xf32>" in d.split("->")[-1] for d in dots) == 2  # the two Dense layers stay float32
    # the check sees a float64 op outside the whitening
    from jasmk.core import runtime

    def sloppy(v, a):
        with runtime.float64():
            extra = jnp.sum(v["whitening"]["prewhiten"]["p"]).astype(jnp.float32)
        return model.apply(v, a, method=head.RetrievalHead.forward_global) + extra

    assert not all(f.startswith("_whiten_float64") for f, _ in _f64_ops(jax.jit(sloppy).lower(variables, x).as_text()))


def test_float64_whitening_leaves_the_users_dtypes_alone():

    config = head.HeadConfig(backbone_dim=8, hdims=(6,), prewhiten=True, nfeat=3)
    variables = head.device_variables(head.init_head(config, seed=0))
    x = np.random.default_rng(0).standard_normal((2, 9, 8)).astype(np.float32)
    f, a, _ = head.extract_local(variables, config, x)
    assert f.dtype == a.dtype == jnp.float32
    seen = []
    thread = threading.Thread(target=lambda: seen.append(jnp.asarray(1.0).dtype))
    thread.start(), thread.join()
    assert jnp.asarray(1.0).dtype == jnp.float32 and seen == [jnp.float32] and not jax.config.jax_enable_x64
    assert whiten.whiten(jnp.ones((3, 8)), np.zeros((1, 8)), np.eye(8)).dtype == jnp.float32
    assert whiten.whiten(np.ones((3, 8)), np.zeros((1, 8)), np.eye(8)).dtype == jnp.float32  # canonical float


def ill_conditioned_whitening(c=16, n=300, seed=0):
    """Tokens of a LayerNorm (a hyperplane) and the float64 whitening learned on them (condition number ~1e7)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 6)) @ rng.standard_normal((6, c))
    t = ((z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True) * 1.3 + 0.1).astype(np.float32)
    m, p = whiten.learn_pca_whitening(t)
    assert np.linalg.cond(p) > 1e6
    return t, m, p


def test_whitening_runs_in_float64_eagerly_and_jitted():
    t, m, p = ill_conditioned_whitening()
    ref = ((t.astype(np.float64) - m) @ p).astype(np.float32)  # MASt3R's Whitener: float64, then back
    f32 = (t - m.astype(np.float32)) @ p.astype(np.float32)
    assert np.abs(f32 - ref).max() > 1e-2 * np.abs(ref).max()  # float32 would be far off
    config = head.HeadConfig(backbone_dim=16, hdims=(), postwhiten=True, nfeat=-1)
    variables = head.variables_from_state_dict({"postwhiten.m": m, "postwhiten.p": p}, config)
    assert variables["whitening"]["postwhiten"]["p"].dtype == np.float64
    model = head.RetrievalHead(config)
    feat = lambda v, a: model.apply(v, a, method=lambda mdl, y: mdl.features_and_attention(y)[0])  # noqa: E731
    x = jnp.asarray(t[None])
    tol = dict(rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(feat(variables, x))[0], ref, **tol)  # eager, host float64 leaves
    np.testing.assert_allclose(np.asarray(jax.jit(feat)(head.device_variables(variables), x))[0], ref, **tol)
    np.testing.assert_allclose(np.asarray(whiten.whiten(x, m, p))[0], ref, **tol)
    # a jitted head given float64 numpy leaves gets them as float32 (JAX casts arguments): it says so
    with pytest.warns(head.WhiteningPrecisionWarning, match="device_variables"):
        jax.jit(feat)(variables, x)


def test_training_steps_through_float64_whitening():
    t, m, p = ill_conditioned_whitening(c=8)
    config = head.HeadConfig(backbone_dim=8, hdims=(8,), prewhiten=True, postwhiten=True, nfeat=4)
    variables = head.init_head(config, seed=0)
    variables = train.relearn_whitening(variables, config, [t], which="pre")
    variables = train.relearn_whitening(variables, config, [t], which="post")
    w = variables["whitening"]
    assert all(a.dtype == jnp.float64 for a in jax.tree_util.tree_leaves(w))
    opt = optax.adam(1e-3)
    params, state = variables["params"], opt.init(variables["params"])
    step = train.make_train_step(config, opt)
    x = jnp.asarray(t[:40].reshape(4, 10, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no float64 request truncated to float32 in the backward pass
        params2, _, loss = step(params, state, w, x[:1], x[1:2], x[None, 2:4])
        # the whitening's gradient is float64 too: against the float64 formula, d/dx sum((x - m) P * c) = c P^T
        c = np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32)  # the float32 cotangent
        pm, pp = np.asarray(w["prewhiten"]["m"]), np.asarray(w["prewhiten"]["p"])
        gx, gp = jax.grad(lambda a, q: jnp.sum(whiten.whiten(a, pm, q) * c), argnums=(0, 1))(x[0], w["prewhiten"]["p"])
        np.testing.assert_allclose(np.asarray(gx), (c.astype(np.float64) @ pp.T).astype(np.float32), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(gp), (np.asarray(x[0], np.float64) - pm).T @ c, rtol=1e-12)
        assert gp.dtype == jnp.float64
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(params2))
    assert jax.tree_util.tree_leaves(params2)[0].dtype == jnp.float32


def test_head_checkpoints_keep_float64_whitening(tmp_path):

    t, m, p = ill_conditioned_whitening()
    path = str(tmp_path / "w_retrieval_x.pth")
    torch = pytest.importorskip("torch")
    args = argparse.Namespace(prewhiten=None, hdims="", residual=False, postwhiten=-1, featweights="l2norm",
                              nfeat=5, imsize=512, nclusters=16)
    torch.save({"args": args, "model": {"postwhiten.m": torch.from_numpy(m), "postwhiten.p": torch.from_numpy(p)}},
               path)
    config, variables, _ = head.load_mast3r_checkpoint(path)
    np.testing.assert_array_equal(variables["whitening"]["postwhiten"]["p"], p)  # bit for bit, float64
    head.save_head(tmp_path / "h", config, variables)
    tree, _ = checkpoint.load_tree(tmp_path / "h")
    np.testing.assert_array_equal(tree["whitening"]["postwhiten"]["p"], p)
    assert tree["whitening"]["postwhiten"]["p"].dtype == np.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config2, variables2 = head.load_head(tmp_path / "h")
    assert config2 == config
    assert variables2["whitening"]["postwhiten"]["p"].dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(variables2["whitening"]["postwhiten"]["p"]), p)
    # float32 whitening given to save_head is stored widened to float64
    v32 = {"whitening": {"postwhiten": {"m": m.astype(np.float32), "p": p.astype(np.float32)}}}
    head.save_head(tmp_path / "h32", config, v32)
    assert checkpoint.load_tree(tmp_path / "h32")[0]["whitening"]["postwhiten"]["p"].dtype == np.float64


def test_a_float32_head_saved_by_the_old_jasmk_loads_and_warns_once_if_ill_conditioned(tmp_path):
    import shutil

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "old_heads")
    src = np.load(os.path.join(here, "source.npz"))
    for name in ("ill", "well"):
        shutil.copytree(os.path.join(here, f"head_f32_{name}"), tmp_path / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config, variables = head.load_head(tmp_path / "ill")
        except ValueError as exc:  # the fixtures were written with orbax-checkpoint 0.12
            if "structure file does not exist" in str(exc):
                pytest.skip(f"this orbax-checkpoint cannot read checkpoints of a newer one: {exc}")
            raise
    mine = [w for w in caught if issubclass(w.category, head.WhiteningPrecisionWarning)]
    assert len(mine) == 1 and "Import the MASt3R .pth again" in str(mine[0].message)
    assert "condition number 2.5e+07" in str(mine[0].message)
    assert variables["whitening"]["postwhiten"]["p"].dtype == jnp.float64
    # the warning is right: the float32-stored whitening gives other features than the float64 one
    x = src["tokens"]
    ref = ((x.astype(np.float64) - src["m_ill"]) @ src["p_ill"]).astype(np.float32)
    got = np.asarray(head.RetrievalHead(config).apply(variables, jnp.asarray(x),
                                                      method=lambda mdl, y: mdl.features_and_attention(y)[0]))
    assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, variables = head.load_head(tmp_path / "well")  # well-conditioned: loads silently
        ref = ((x.astype(np.float64) - src["m_well"]) @ src["p_well"]).astype(np.float32)
        got = np.asarray(head.RetrievalHead(config).apply(variables, jnp.asarray(x),
                                                          method=lambda mdl, y: mdl.features_and_attention(y)[0]))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.slow
def test_float64_whitening_under_the_users_global_x64():
    """A user who turned jax_enable_x64 on gets the same features (and float32 ones, as without it)."""
    import textwrap

    script = textwrap.dedent("""
        import jax, numpy as np, jax.numpy as jnp
        assert jax.config.jax_enable_x64
        from jasmk import head
        from jasmk.head import whiten
        rng = np.random.default_rng(0)
        z = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 16))
        t = ((z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True) * 1.3 + 0.1).astype(np.float32)
        m, p = whiten.learn_pca_whitening(t)
        config = head.HeadConfig(backbone_dim=16, hdims=(), postwhiten=True, nfeat=-1)
        v = head.device_variables(head.variables_from_state_dict({"postwhiten.m": m, "postwhiten.p": p}, config))
        f, a, idx = head.extract_local(v, config, t[None])
        ref = ((t.astype(np.float64) - m) @ p).astype(np.float32)
        assert f.dtype == jnp.float32, f.dtype
        np.testing.assert_allclose(np.asarray(f)[0], ref[idx[0]], rtol=1e-6, atol=1e-6 * np.abs(ref).max())
        print("ok")
    """)
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------
# loading never runs code: torch checkpoints


def test_mast3r_checkpoint_loads_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    from helpers import make_mast3r_checkpoint

    from jasmk import head

    path = str(tmp_path / "retrieval.pth")
    make_mast3r_checkpoint(path, c=8, hdims="8_6", residual=False, prewhiten=1, postwhiten=None, nfeat=4)
    config, _, info = head.load_mast3r_checkpoint(path)
    assert config.backbone_dim == 8 and info == {"imsize": 512, "nclusters": 1024}

    marker = tmp_path / "pwned"
    torch.save({"args": Hostile(marker), "model": {}}, str(tmp_path / "evil.pth"))
    with pytest.raises(ValueError, match="weights only"):
        head.load_mast3r_checkpoint(str(tmp_path / "evil.pth"))
    assert not marker.exists()
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError):
        head.load_mast3r_checkpoint(str(tmp_path / "empty.pth"))


def test_old_torch_is_refused(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from jasmk import head

    monkeypatch.delattr(torch.serialization, "safe_globals")
    with pytest.raises(ValueError, match="safe_globals"):
        head.load_mast3r_checkpoint(str(tmp_path / "x.pth"))


def test_local_descriptors_compile_once_per_token_step_and_match_the_unpadded_head():
    """Frames of other sizes (aspect ratios) within a step of the token ladder reuse one compiled program, and
    the padded head keeps exactly what the head keeps without padding."""
    rng = np.random.default_rng(0)
    config = head.HeadConfig(backbone_dim=16, hdims=(24, 12), prewhiten=True, postwhiten=True, nfeat=20)
    variables = head.device_variables(head.init_head(config, seed=1))
    variables["whitening"] = jax.tree_util.tree_map(
        lambda a: jax.device_put(np.asarray(a) + 0.01 * rng.standard_normal(a.shape)) if a.ndim == 2 and a.shape[0] > 1
        else a, variables["whitening"])
    variables = head.device_variables(variables)
    model = head.RetrievalHead(config)
    sizes = [100, 108, 105, 112]  # one step of the ladder
    assert len({head.token_capacity(n) for n in sizes}) == 1 and head.token_capacity(96) == 96
    with count_compilations() as compiles:
        frames = [rng.standard_normal((1, n, 16)).astype(np.float32) for n in sizes]
        head.local_descriptors(variables, config, frames[0])  # warm up the step
        compiles.clear()
        outs = [head.local_descriptors(variables, config, x) for x in frames[1:]]
        assert compiles == [], f"{len(compiles)} compilations for frames of the same token step"
        for x, (f, a, idx) in zip(frames[1:], outs):
            rf, ra, ridx = model.apply(variables, jnp.asarray(x), method=head.RetrievalHead.forward_local)
            np.testing.assert_array_equal(np.asarray(idx), np.asarray(ridx))
            # the same float32 ops, compiled with another padding: equal to rounding
            np.testing.assert_allclose(np.asarray(a), np.asarray(ra), rtol=1e-6)
            np.testing.assert_allclose(np.asarray(f), np.asarray(rf), rtol=1e-6, atol=1e-6)
