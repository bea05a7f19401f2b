"""Shared oracles and data for the tests: independent re-derivations (asmk's parameters and a codebook of given
centroids, MASt3R's whitening recipe, head, pair graph and image loading) and synthetic data shaped like users'.
Test files import from here; conftest.py holds only fixtures and markers."""

import argparse
import contextlib
import functools
import os

import numpy as np
import pytest

C = 16  # the backbone channels of PatchBackbone


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


def mast3r_projector(c, hdims):
    """MASt3R's projector for ``hdims`` ('96_64'; '' is none) in torch: (Linear, LayerNorm, GELU) per hidden dim,
    then a Linear. Returns ``(projector, dims)``."""
    import torch

    dims = [int(h) for h in hdims.split("_")] if hdims else []
    layers, d = [], c
    for h in dims[:-1]:
        layers += [torch.nn.Linear(d, h), torch.nn.LayerNorm(h), torch.nn.GELU()]
        d = h
    if dims:
        layers.append(torch.nn.Linear(d, dims[-1]))
    return torch.nn.Sequential(*layers), dims


def make_mast3r_checkpoint(path, *, c, hdims, residual, prewhiten, postwhiten, nfeat, seed=0, imsize=512,
                           nclusters=1024):
    """A synthetic checkpoint in MASt3R's retrieval format, and the torch modules holding the same weights."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    projector, dims = mast3r_projector(c, hdims)
    with torch.no_grad():
        for prm in projector.parameters():
            offset = 1.0 if prm.ndim == 1 and prm.shape[0] in dims else 0
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.3 + offset)
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
                              postwhiten=postwhiten, featweights="l2norm", nfeat=nfeat, imsize=imsize,
                              nclusters=nclusters)
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


def mast3r_oracle(sim, na, k, seed, *, exclude_self=False):
    """retrieval-Na-k written out with Python sets, MASt3R's way: np.random.seed(seed) then a global-RNG draw."""
    n = len(sim)
    dist = 1.0 - np.asarray(sim, np.float64)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        first = int(np.random.choice(n))
    finally:
        np.random.set_state(state)
    keys = [first] if na else []
    while len(keys) < na:
        best, best_d = None, -np.inf
        for c in range(n):
            dc = min(dist[a, c] for a in keys)
            if dc > best_d:
                best, best_d = c, dc
        assert best not in keys  # the test matrices never make MASt3R repeat a key image
        keys.append(best)
    edges = set()
    for a in keys:
        for b in keys:
            if a != b:
                edges.add((min(a, b), max(a, b)))
    for i in range(n):
        if keys and i not in keys:
            nk = min(keys, key=lambda c: (dist[i, c], keys.index(c)))
            edges.add((min(i, nk), max(i, nk)))
    for i in range(n):
        cands = [j for j in range(n) if not (exclude_self and j == i)]
        for j in sorted(cands, key=lambda j: (dist[i, j], j))[:k]:
            if j != i:
                edges.add((min(i, j), max(i, j)))
    return sorted(edges), keys


class PatchBackbone:
    """A deterministic stand-in for MASt3R's encoder: 16x16 patches -> fixed random projection -> tanh.

    Follows the Retriever's contract: ``[B, 3, H, W]`` float tensor in [-1, 1] -> ``[B, N, C]`` torch tensor.
    """

    def __init__(self, c=C, seed=0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn((3 * 16 * 16, c), generator=g, dtype=torch.float32) / 16.0
        self.calls = []

    def __call__(self, images):
        import torch

        assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[1] == 3
        self.calls.append(tuple(images.shape))
        b = images.shape[0]
        patches = torch.nn.functional.unfold(images, kernel_size=16, stride=16)  # [B, 768, N]
        return torch.tanh(patches.transpose(1, 2) @ self.w.to(images.device)).reshape(b, -1, self.w.shape[1])


def reference_load(path, size, patch=16):
    """DUSt3R's load_images (long-side branch), re-derived with PIL + numpy."""
    import torch
    from PIL import Image as PIL_Image
    from PIL import ImageOps

    img = ImageOps.exif_transpose(PIL_Image.open(path)).convert("RGB")
    w1, h1 = img.size
    s = max(w1, h1)
    img = img.resize(tuple(int(round(x * size / s)) for x in img.size),
                     PIL_Image.LANCZOS if s > size else PIL_Image.BICUBIC)
    w, h = img.size
    cx, cy = w // 2, h // 2
    hw, hh = ((2 * cx) // patch) * patch / 2, ((2 * cy) // patch) * patch / 2
    if w == h:
        hh = 3 * hw / 4
    img = img.crop((cx - hw, cy - hh, cx + hw, cy + hh))
    x = np.asarray(img, np.float32).transpose(2, 0, 1) / np.float32(255)
    return torch.from_numpy(((x - np.float32(0.5)) / np.float32(0.5))[None].astype(np.float32))


class Hostile:
    """Pickles as a call of os.system (touching ``marker``): what a loader must never run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@contextlib.contextmanager
def count_compilations():
    """A list that collects one entry per XLA program compiled inside the block (JAX's monitoring event: a program
    served from JAX's caches does not count)."""
    import jax

    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def _no_grad(fn):
    """``fn`` run under ``torch.no_grad()`` (torch imported when called: the helpers load without it)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


# MASt3R-shaped stand-ins (test_mast3r_precision.py, test_slam.py): a backbone ending in a LayerNorm, MASt3R's
# whitening recipe on its tokens, MASt3R's head in torch and a checkpoint + asmk codebook made as MASt3R makes them
LN_C = 64          # backbone channels (MASt3R: 1024)
LN_LATENT = 24     # rank of the backbone's token map before its last Linear + LayerNorm
LN_IMSIZE = 192    # long side: 192 x 144 images give 12 x 9 = 108 tokens
LN_NFEAT = 50      # local features kept per image (MASt3R: 300 of 768)
LN_NCLUSTERS = 32


class LayerNormBackbone:
    """A stand-in for MASt3R's encoder that ends, as it does, in a LayerNorm (with its learned affine):
    16x16 patches -> fixed random map -> GELU -> Linear -> LayerNorm. With ``layernorm=False`` the last step is a
    tanh instead, and the tokens fill their space (a well-conditioned whitening)."""

    def __init__(self, *, layernorm=True, seed=0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn((3 * 16 * 16, LN_LATENT), generator=g) / 16.0
        self.w2 = torch.randn((LN_LATENT, LN_C), generator=g) / LN_LATENT ** 0.5
        self.b2 = torch.randn((LN_C,), generator=g) * 0.1
        self.norm = torch.nn.LayerNorm(LN_C, eps=1e-6) if layernorm else None
        if self.norm is not None:
            with torch.no_grad():
                self.norm.weight.copy_(torch.rand((LN_C,), generator=g) * 1.5 + 0.25)
                self.norm.bias.copy_(torch.randn((LN_C,), generator=g) * 0.2)

    @_no_grad
    def __call__(self, images):
        import torch

        b = images.shape[0]
        patches = torch.nn.functional.unfold(images, kernel_size=16, stride=16).transpose(1, 2)
        h = torch.nn.functional.gelu(patches @ self.w1) @ self.w2 + self.b2
        out = self.norm(h) if self.norm is not None else torch.tanh(h)
        return out.reshape(b, -1, LN_C)


def write_scenes(folder, rng, n_scenes, views, tag):
    """``views`` photos of each of ``n_scenes`` smooth random scenes: shifted crops with noise, three aspect
    ratios (landscape, portrait, square: DUSt3R crops the square one to 4:3)."""
    import PIL.Image as PIL_Image

    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(150, 200), (200, 150), (180, 180)]
    paths = []
    for s in range(n_scenes):
        base = np.asarray(PIL_Image.fromarray(rng.integers(0, 256, (7, 7, 3)).astype(np.uint8)).resize(
            (230, 230), PIL_Image.BICUBIC), np.float64)
        for v in range(views):
            h, w = sizes[(s + v) % 3]
            oy, ox = rng.integers(0, 230 - h + 1), rng.integers(0, 230 - w + 1)
            img = base[oy:oy + h, ox:ox + w] + rng.normal(0, 6, (h, w, 3))
            path = folder / f"{tag}{s:03d}_{v}.png"
            PIL_Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
            paths.append(str(path))
    return paths


def mast3r_learn_whitening(x):
    """MASt3R's ``pcawhitenlearn_shrinkage`` (s = 1) as MASt3R calls it: on the float32 features, so numpy computes
    ``(m, P)`` in float32 (the eigenvalue of the LayerNorm's hyperplane comes out about zero and is clipped)."""
    m, p = reference_whitening(x)
    assert x.dtype == m.dtype == p.dtype == np.float32
    return m, p


class MASt3RHead:
    """MASt3R's RetrievalModel head in torch: float64 Whitener (``whitening_dtype``), float32 projector,
    attention = L2 norm of the projected features before post-whitening, top-``nfeat`` selection."""

    def __init__(self, *, projector, residual, nfeat, whitening_dtype=None):
        self.projector, self.residual, self.nfeat = projector, residual, nfeat
        import torch

        self.whiteners, self.dtype = {}, torch.float64 if whitening_dtype is None else whitening_dtype

    def whiten(self, t, name):
        import torch

        if name not in self.whiteners:
            return t
        m, p = self.whiteners[name]
        x = t.reshape(-1, t.shape[-1]).to(self.dtype)
        return torch.matmul(x - m.to(self.dtype), p.to(self.dtype)).reshape(t.shape).to(t.dtype)

    @_no_grad
    def features_and_attention(self, tokens):
        pre = self.whiten(tokens, "prewhiten")
        proj = self.projector(pre) + (pre if self.residual else 0.0)
        return self.whiten(proj, "postwhiten"), proj.norm(dim=-1)

    @_no_grad
    def forward_local(self, tokens):
        import torch

        feat, attn = self.features_and_attention(tokens)
        top_attn, top_idx = torch.topk(attn, min(int(self.nfeat), attn.shape[1]), dim=1)
        return torch.gather(feat, 1, top_idx[..., None].expand(-1, -1, feat.shape[2])), top_attn, top_idx


def tokens_of(backbone, paths):
    return [backbone(reference_load(p, LN_IMSIZE)) for p in paths]


def build_checkpoint(folder, name, *, backbone, train_paths, prewhiten, hdims, postwhiten, seed=0):
    """A MASt3R retrieval checkpoint made with MASt3R's recipe: whitening learned on the backbone's tokens of the
    training images (pre-whitening on tokens, post-whitening on projected features), stored as MASt3R stores it
    (float64 parameters); then an asmk codebook trained on the head's local features, cached as MASt3R keeps it."""
    import torch
    from asmk import asmk_method

    torch.manual_seed(seed)  # torch's default initialisation, as an untrained MASt3R projector has
    projector = mast3r_projector(LN_C, hdims)[0].eval()
    ref = MASt3RHead(projector=projector, residual=False, nfeat=LN_NFEAT)
    tokens = tokens_of(backbone, train_paths)
    state = {f"projector.{k}": v for k, v in projector.state_dict().items()}
    if prewhiten is not None:
        m, p = mast3r_learn_whitening(torch.cat([t[0] for t in tokens]).numpy())
        ref.whiteners["prewhiten"] = (torch.from_numpy(m).double(), torch.from_numpy(p).double())
    if postwhiten is not None:
        proj = [ref.features_and_attention(t)[0][0] for t in tokens]  # no post-whitening yet: projected features
        m, p = mast3r_learn_whitening(torch.cat(proj).numpy())
        ref.whiteners["postwhiten"] = (torch.from_numpy(m).double(), torch.from_numpy(p).double())
    for key, (m, p) in ref.whiteners.items():
        state[f"{key}.m"], state[f"{key}.p"] = m, p
    args = argparse.Namespace(pretrained="x", freeze_backbone=1, prewhiten=prewhiten, hdims=hdims, residual=False,
                              postwhiten=postwhiten, featweights="l2norm", nfeat=LN_NFEAT, imsize=LN_IMSIZE,
                              nclusters=LN_NCLUSTERS)
    ckpt = str(folder / f"{name}_retrieval_trainingfree.pth")
    torch.save({"args": args, "model": state}, ckpt)
    feats = np.concatenate([ref.forward_local(t)[0][0].numpy() for t in tokens])
    params = asmk_params(size=LN_NCLUSTERS)
    asmk_method.ASMKMethod.initialize_untrained(params).train_codebook(
        feats, cache_path=str(folder / f"{name}_retrieval_codebook.pkl"))
    return ckpt, ref
