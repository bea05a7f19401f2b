"""Retrieval head: whitening, selection, Flax head against a torch/numpy evaluation of a MASt3R-format checkpoint,
Orbax round trip, optax training."""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jasmk import head, select, train, whiten


def reference_whitening(x, s=1.0):
    """The seed's pcawhitenlearn_shrinkage (general eigensolver), re-derived in numpy."""
    n = x.shape[0]
    m = x.mean(axis=0, keepdims=True)
    xc = x - m
    cov = xc.T @ xc
    cov = (cov + cov.T) / (2 * n)
    val, vec = np.linalg.eig(cov)
    order = val.argsort()[::-1]
    val, vec = np.clip(val[order].real, 1e-14, None), vec[:, order].real
    p = np.linalg.inv(np.diag(val ** (0.5 * s))) @ vec.T
    return m, p.T


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
    for bad in (-1.5, 0.5, "x"):
        with pytest.raises(ValueError):
            select.resolve_nfeat(bad, 10)


def make_mast3r_checkpoint(path, *, c, hdims, residual, prewhiten, postwhiten, nfeat, seed=0, imsize=512,
                           nclusters=1024):
    """A synthetic checkpoint in MASt3R's retrieval format, and the torch modules holding the same weights."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    dims = [int(h) for h in hdims.split("_")] if hdims else []
    layers, d = [], c
    for h in dims[:-1]:
        layers += [torch.nn.Linear(d, h), torch.nn.LayerNorm(h), torch.nn.GELU()]
        d = h
    if dims:
        layers.append(torch.nn.Linear(d, dims[-1]))
    projector = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for prm in projector.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.3 + (1.0 if prm.ndim == 1 and prm.shape[0] in dims else 0))
    state = {f"projector.{k}": v for k, v in projector.state_dict().items()}
    state["backbone.enc.weight"] = torch.zeros(3)  # frozen-backbone keys are ignored
    whiteners = {}
    for name, on, dim in (("prewhiten", prewhiten, c), ("postwhiten", postwhiten, dims[-1] if dims else c)):
        if on is not None:
            m = torch.randn((1, dim), generator=g, dtype=torch.float64)
            p = torch.randn((dim, dim), generator=g, dtype=torch.float64) / dim**0.5
            state[f"{name}.m"], state[f"{name}.p"] = m, p
            whiteners[name] = (m, p)
    args = argparse.Namespace(pretrained="x", freeze_backbone=1, prewhiten=prewhiten, hdims=hdims, residual=residual,
                              postwhiten=postwhiten, featweights="l2norm", nfeat=nfeat, imsize=imsize, nclusters=nclusters)
    torch.save({"args": args, "model": state}, path)
    return projector, whiteners


def torch_reference(x, projector, whiteners, *, residual, nfeat):
    """The seed's RetrievalModel forward passes, in torch."""
    import torch

    def wh(t, name):
        if name not in whiteners:
            return t
        m, p = whiteners[name]
        return (torch.matmul(t.reshape(-1, t.shape[-1]).double() - m, p)).reshape(t.shape).to(t.dtype)

    with torch.no_grad():
        xt = torch.from_numpy(x)
        pre = wh(xt, "prewhiten")
        proj = projector(pre) + (pre if residual else 0.0)
        attn = proj.norm(dim=-1)
        feat = wh(proj, "postwhiten")
        glob = torch.nn.functional.normalize((feat * attn[:, :, None]).sum(dim=1), dim=1)
        if nfeat < 0:  # MASt3R's how_select_local
            assert nfeat >= -1.0
            k = int(-nfeat * feat.size(1))
        else:
            k = int(nfeat)
        top_attn, top_idx = torch.topk(attn, min(k, attn.size(1)), dim=1)
        top_feat = torch.gather(feat, 1, top_idx.unsqueeze(-1).expand(-1, -1, feat.size(2)))
    return glob.numpy(), top_feat.numpy(), top_attn.numpy(), top_idx.numpy()


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
        from jasmk import checkpoint

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
