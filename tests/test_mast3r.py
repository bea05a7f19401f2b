"""jasmk.mast3r.Retriever against MASt3R's Retriever re-derived: DUSt3R's image preprocessing, MASt3R's head in
torch, asmk 0.1.1 with MASt3R's parameters; and the promise that building a Retriever starts no JAX backend."""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL_Image = pytest.importorskip("PIL.Image")

from helpers import PatchBackbone, make_mast3r_checkpoint, reference_load, torch_reference  # noqa: E402

C = 16        # backbone channels
IMSIZE = 128  # long side of the resized images (a multiple of 64: a square image crops to 4:3 in whole patches)
NCLUSTERS = 12


def write_images(folder, rng):
    """Six PNGs of three 'scenes': each scene twice, the second a shifted, noisier copy; sizes differ."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    sizes = [(90, 120), (90, 120), (120, 80), (120, 80), (100, 100), (100, 100)]
    # smooth scenes (low-frequency content), so that a small shift keeps the patches alike
    bases = [np.asarray(PIL_Image.fromarray(rng.integers(0, 256, (9, 9, 3)).astype(np.uint8)).resize(
        (130, 130), PIL_Image.BICUBIC), np.float64) for _ in range(3)]
    for i, (h, w) in enumerate(sizes):
        base = bases[i // 2]
        off = 0 if i % 2 == 0 else 2
        img = base[off:off + h, off:off + w] + rng.normal(0, 8 if i % 2 else 2, (h, w, 3))
        path = folder / f"img{i}.png"
        PIL_Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    (folder / "notes.txt").write_text("not an image")
    return paths


def write_codebook(path, dim, *, size=NCLUSTERS, seed=1):
    centroids = np.random.default_rng(seed).standard_normal((size, dim)).astype(np.float32)
    with open(path, "wb") as handle:
        pickle.dump({"type": "Codebook", "params": {"size": size}, "state": {"centroids": centroids}}, handle)
    return centroids


@pytest.fixture
def setup(tmp_path):
    ckpt = str(tmp_path / "tiny_retrieval_trainingfree.pth")
    hdims, residual, nfeat = "24_16", False, -0.75
    projector, whiteners = make_mast3r_checkpoint(ckpt, c=C, hdims=hdims, residual=residual, prewhiten=1,
                                                  postwhiten=0, nfeat=nfeat, imsize=IMSIZE, nclusters=NCLUSTERS)
    cb_path = str(tmp_path / "tiny_retrieval_codebook.pkl")
    paths = write_images(tmp_path / "images", np.random.default_rng(5))
    s = dict(ckpt=ckpt, cb_path=cb_path, paths=paths, folder=str(tmp_path / "images"), projector=projector,
             whiteners=whiteners, residual=residual, nfeat=nfeat)
    train_reference_codebook(s, paths)
    return s


def mast3r_asmk_params():
    """The asmk params of MASt3R's Retriever (CPU faiss index instead of gpu_id 0)."""
    return {"index": {"gpu_id": None}, "train_codebook": {"codebook": {"size": NCLUSTERS}},
            "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                          "quantize": {"multiple_assignment": 1}, "aggregate": {}},
            "query_ivf": {"quantize": {"multiple_assignment": 5}, "aggregate": {}, "search": {"topk": None},
                          "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}}}


def reference_features(s, paths):
    """MASt3R's extract_local_features re-derived: per image, the backbone, then forward_local in torch."""
    backbone = PatchBackbone()
    feats, ids = [], []
    for i, p in enumerate(paths):
        bfeat = backbone(reference_load(p, IMSIZE)).numpy()
        _, top_feat, _, _ = torch_reference(bfeat, s["projector"], s["whiteners"], residual=s["residual"],
                                            nfeat=s["nfeat"])
        f = top_feat.reshape(-1, top_feat.shape[-1])
        feats.append(f)
        ids.append(np.full(f.shape[0], i, np.int64))
    return np.concatenate(feats).astype(np.float32), np.concatenate(ids)


def train_reference_codebook(s, paths):
    """A codebook as MASt3R's was made: asmk's k-means on local features, cached as asmk's pickle."""
    from asmk import asmk_method

    feat, _ = reference_features(s, paths)
    asmk_method.ASMKMethod.initialize_untrained(mast3r_asmk_params()).train_codebook(feat, cache_path=s["cb_path"])


def reference_scores(s, paths):
    """MASt3R's Retriever.__call__ re-derived: local features, then asmk 0.1.1 with MASt3R's params."""
    from asmk import asmk_method

    feat, ids = reference_features(s, paths)
    method = asmk_method.ASMKMethod.initialize_untrained(mast3r_asmk_params())
    method = method.train_codebook(None, cache_path=s["cb_path"])
    dataset = method.build_ivf(feat, ids)
    _, _, ranks, ranked = dataset.query_ivf(feat, ids)
    scores = np.empty_like(ranked)
    scores[np.arange(ranked.shape[0])[:, None], ranks] = ranked
    return scores, feat, ids


def test_image_loading_matches_dust3r(setup):
    from jasmk import mast3r

    for p in setup["paths"]:
        ours = mast3r.load_image(p, IMSIZE)
        ref = reference_load(p, IMSIZE)
        assert ours.shape == ref.shape and ours.dtype == torch.float32
        assert ours.shape[2] % 16 == 0 and ours.shape[3] % 16 == 0
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=0, atol=1e-6)
    # the 100x100 square image is cropped to 4:3 as DUSt3R does
    assert tuple(mast3r.load_image(setup["paths"][4], IMSIZE).shape) == (1, 3, 96, 128)


def test_retriever_matches_mast3r_with_asmk(setup, tmp_path):
    from jasmk import mast3r

    backbone = PatchBackbone()
    retriever = mast3r.Retriever(setup["ckpt"], backbone=backbone, device="cpu")
    assert retriever.imsize == IMSIZE and retriever.config.nfeat == setup["nfeat"]
    ref, ref_feat, ref_ids = reference_scores(setup, setup["paths"])

    out = str(tmp_path / "out" / "scores.npy")
    scores = retriever(setup["folder"], outfile=out)  # the folder: its PNGs in name order (notes.txt skipped)
    assert scores.dtype == ref.dtype == np.float64 and scores.shape == (6, 6)
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.load(out), scores)
    # the outfile: an existing .npy is replaced atomically, anything else is refused before any work
    np.save(out, np.zeros(3))
    np.testing.assert_array_equal(retriever(setup["paths"], outfile=out), np.load(out))
    calls = len(backbone.calls)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for bad in (notes, tmp_path):
        with pytest.raises(ValueError, match="not a .npy|existing directory"):
            retriever(setup["folder"], outfile=str(bad))
    assert notes.read_text() == "mine" and len(backbone.calls) == calls
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".tmp-")]
    assert len(np.unique(np.round(scores, 6))) > 25 and (scores > 0).all()  # a matrix with content to compare
    assert len(backbone.calls) == 12  # batch_size=1, like MASt3R (two calls of 6 images)

    # the local features themselves equal MASt3R's
    feat, ids = retriever.local_features(setup["paths"])
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(feat, ref_feat, rtol=1e-5, atol=1e-5)

    # a list of paths, a list file, and batches of same-size images give the same matrix
    listfile = tmp_path / "list.txt"
    listfile.write_text("# images\n\n" + "\n".join(setup["paths"]) + "\n")
    np.testing.assert_array_equal(retriever(str(listfile)), scores)
    batched = PatchBackbone()
    r2 = mast3r.Retriever(setup["ckpt"], backbone=batched, device="cpu", batch_size=4, num_workers=2)
    np.testing.assert_allclose(r2(setup["paths"]), scores, rtol=1e-6, atol=1e-6)
    assert [c[0] for c in batched.calls] == [2, 2, 2]  # consecutive images of one size share a call

    # a permuted list gives the permuted matrix
    perm = [3, 0, 5, 1, 4, 2]
    np.testing.assert_allclose(retriever([setup["paths"][i] for i in perm]), scores[np.ix_(perm, perm)],
                               rtol=1e-6, atol=1e-6)


def test_images_in_memory_and_datasets_give_the_matrix_of_the_files(setup):
    """A list of arrays, PIL images or DUSt3R-prepared tensors, and a torch Dataset of them, give what the files
    give (EXIF orientation and DUSt3R's preparation included)."""
    import PIL.Image
    import PIL.ImageOps

    from jasmk import mast3r

    retriever = mast3r.Retriever(setup["ckpt"], backbone=PatchBackbone(), device="cpu")
    ref = retriever(setup["paths"])
    pil = []
    for p in setup["paths"]:
        with PIL.Image.open(p) as im:
            pil.append(PIL.ImageOps.exif_transpose(im).convert("RGB"))
    arrays = [np.array(im) for im in pil]
    prepared = [{"img": reference_load(p, IMSIZE)} for p in setup["paths"]]  # DUSt3R's load_images items

    class Images(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    for images in (arrays, pil, prepared, Images(arrays), Images([torch.from_numpy(a) for a in arrays])):
        np.testing.assert_allclose(retriever(images), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        retriever([arrays[0].astype(np.float32)])
    with pytest.raises(ValueError, match="multiples of 16"):
        retriever([torch.zeros((1, 3, 20, 32))])


def test_identity_head_takes_the_codebook_dim(tmp_path):
    """hdims '' without whitening: MASt3R's identity head; the dim comes from the backbone/codebook."""
    from jasmk import mast3r

    ckpt = str(tmp_path / "id_x.pth")
    make_mast3r_checkpoint(ckpt, c=C, hdims="", residual=False, prewhiten=None, postwhiten=None, nfeat=20,
                           imsize=IMSIZE, nclusters=NCLUSTERS)
    cb_path = str(tmp_path / "id_codebook.pkl")
    paths = write_images(tmp_path / "images", np.random.default_rng(1))
    s = dict(projector=torch.nn.Sequential(), whiteners={}, residual=False, nfeat=20, cb_path=cb_path)
    train_reference_codebook(s, paths)
    retriever = mast3r.Retriever(ckpt, backbone=PatchBackbone(), device="cpu")
    assert retriever.config.backbone_dim == C and retriever.config.hdims == ()
    ref, _, _ = reference_scores(s, paths)
    np.testing.assert_allclose(retriever(paths), ref, rtol=1e-5, atol=1e-5)


def test_retriever_errors(setup, tmp_path):
    from jasmk import mast3r

    with pytest.raises(ValueError, match="does not exist"):
        mast3r.Retriever(str(tmp_path / "nope_x.pth"), backbone=PatchBackbone(), device="cpu")
    with pytest.raises(ValueError, match="backbone must be"):
        mast3r.Retriever(setup["ckpt"], backbone=42, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        mast3r.Retriever(setup["ckpt"], backbone=PatchBackbone(), device="cpu", batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            mast3r.Retriever(setup["ckpt"], backbone=PatchBackbone())  # MASt3R's default device='cuda'
    try:
        import mast3r.model  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="MASt3R is not importable"):
            mast3r.Retriever(setup["ckpt"], device="cpu")  # backbone=None needs MASt3R
    # codebook: missing, wrong size, wrong dim
    other = tmp_path / "other_ckpt.pth"
    other.write_bytes(open(setup["ckpt"], "rb").read())
    with pytest.raises(ValueError, match="other_codebook.pkl"):
        mast3r.Retriever(str(other), backbone=PatchBackbone(), device="cpu")
    write_codebook(str(tmp_path / "other_codebook.pkl"), 16, size=NCLUSTERS + 1)
    with pytest.raises(ValueError, match="nclusters"):
        mast3r.Retriever(str(other), backbone=PatchBackbone(), device="cpu")
    write_codebook(str(tmp_path / "other_codebook.pkl"), 10)
    with pytest.raises(ValueError, match="10-dim"):
        mast3r.Retriever(str(other), backbone=PatchBackbone(), device="cpu")
    (tmp_path / "other_codebook.pkl").write_bytes(b"garbage")
    with pytest.raises(ValueError):
        mast3r.Retriever(str(other), backbone=PatchBackbone(), device="cpu")

    retriever = mast3r.Retriever(setup["ckpt"], backbone=lambda images: torch.zeros(images.shape[0], 5, 7),
                                 device="cpu")
    with pytest.raises(ValueError, match=r"\[\.\.\., N, 16\]"):
        retriever(setup["paths"])
    retriever = mast3r.Retriever(setup["ckpt"], backbone=lambda images: torch.zeros(5, C), device="cpu")
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        retriever(setup["paths"])
    retriever = mast3r.Retriever(setup["ckpt"], backbone=lambda images: torch.full((1, 5, C), float("nan")),
                                 device="cpu")
    with pytest.raises(ValueError, match="NaN"):
        retriever(setup["paths"])
    retriever = mast3r.Retriever(setup["ckpt"], backbone=PatchBackbone(), device="cpu")
    with pytest.raises(ValueError, match="no images"):
        retriever([])
    with pytest.raises(ValueError, match="neither a folder"):
        retriever(str(tmp_path / "missing"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        retriever([str(tmp_path / "broken.png")])

    # 0 < nfeat < 1: MASt3R's head keeps int(nfeat) = 0 features, there is nothing to index
    ckpt = str(tmp_path / "zero_x.pth")
    make_mast3r_checkpoint(ckpt, c=C, hdims="16", residual=False, prewhiten=None, postwhiten=None, nfeat=0.5,
                           imsize=IMSIZE, nclusters=NCLUSTERS)
    write_codebook(str(tmp_path / "zero_codebook.pkl"), 16)
    with pytest.raises(ValueError, match="keeps no local features"):
        mast3r.Retriever(ckpt, backbone=PatchBackbone(), device="cpu")(setup["paths"])


def test_torch_features_reach_jax():
    from jasmk import mast3r

    t = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    x = mast3r.features_to_jax(t)
    assert isinstance(x, np.ndarray) and x.dtype == np.float32  # CPU: through numpy
    np.testing.assert_array_equal(x, t.numpy().astype(np.float32))
    with pytest.raises(ValueError, match="floating point"):
        mast3r.features_to_jax(torch.zeros((1, 2, 3), dtype=torch.int64))


FORK_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    sys.path.insert(0, {tests!r})
    import numpy as np, torch
    from helpers import PatchBackbone
    import jasmk.core.runtime
    from jasmk.mast3r import Retriever

    warnings.simplefilter("always")
    r = Retriever({ckpt!r}, backbone=PatchBackbone(), device="cpu")
    print("started-after-init", jasmk.core.runtime.backend_started(), flush=True)
    print("prealloc", os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"), flush=True)
    if {compute!r}:
        r({paths!r})
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print("started-after-fork", jasmk.core.runtime.backend_started(), flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("compute", [False, True])
def test_constructing_the_retriever_starts_no_jax(setup, compute):
    """Before the first call nothing starts JAX, so a fork (torch's DataLoader workers) is safe; the control run
    (a call first) shows that the check sees JAX's fork warning when JAX did start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT_")}
    env["JAX_PLATFORMS"] = "cpu"
    script = FORK_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), ckpt=setup["ckpt"],
                                paths=setup["paths"][:2], compute=compute)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "prealloc false" in proc.stdout
    warned = "os.fork() was called" in proc.stderr and "JAX is multithreaded" in proc.stderr
    if compute:
        assert warned and "started-after-fork True" in proc.stdout, (proc.stdout, proc.stderr)
    else:
        assert "started-after-init False" in proc.stdout and "started-after-fork False" in proc.stdout, proc.stdout
        assert not warned, proc.stderr
        assert "RuntimeWarning" not in proc.stderr, proc.stderr


class FakeMASt3R(torch.nn.Module):
    """Stands for AsymmetricMASt3R: ``_encode_image(img, true_shape) -> (feats, pos, None)``, ``enc_embed_dim``."""

    def __init__(self, enc_embed_dim=C):
        super().__init__()
        self.enc_embed_dim = enc_embed_dim
        self.inner = PatchBackbone()
        self.shapes = []

    def _encode_image(self, image, true_shape):
        assert not self.training  # the Retriever puts the model in eval mode
        self.shapes.append(true_shape.tolist())
        feats = self.inner(image)
        return feats, torch.zeros(feats.shape[:2] + (2,), dtype=torch.int64), None


def test_a_mast3r_model_is_called_like_mast3r_does(setup):
    from jasmk import mast3r

    ref = mast3r.Retriever(setup["ckpt"], backbone=PatchBackbone(), device="cpu")(setup["paths"])
    model = FakeMASt3R()
    scores = mast3r.Retriever(setup["ckpt"], backbone=model, device="cpu")(setup["paths"])
    np.testing.assert_array_equal(scores, ref)
    expected = [[list(reference_load(p, IMSIZE).shape[2:])] for p in setup["paths"]]
    assert model.shapes == expected  # true_shape [[H, W]] per image, as DUSt3R's loader gives it
    with pytest.raises(ValueError, match="12-channel"):
        mast3r.Retriever(setup["ckpt"], backbone=FakeMASt3R(enc_embed_dim=12), device="cpu")
