"""MASt3R's image retrieval without asmk: a :class:`Retriever` that turns images into MASt3R-SfM's score matrix.

It does the job of ``mast3r.retrieval.processor.Retriever`` with the same constructor arguments and the same call,
so MASt3R's ``demo.py`` and ``make_pairs.py`` work after changing one import::

    from jasmk.mast3r import Retriever        # instead of: from mast3r.retrieval.processor import Retriever

    retriever = Retriever("MASt3R_..._retrieval_trainingfree.pth", backbone=model, device="cuda")
    sim = retriever(image_paths)              # [n, n] float64, sim[query, database]

What happens, step by step, as in MASt3R:

1. The retrieval checkpoint (torch ``.pth``, read weights-only) becomes the Flax head (:mod:`jasmk.head`); the
   ASMK codebook is read from beside it by MASt3R's naming rule (:func:`jasmk.head.mast3r_codebook_path`)
   through the restricted unpickler. Neither touches a device: JAX starts at the first call, and before that
   :func:`jasmk.runtime.share_gpu_with_torch` has told it to allocate GPU memory on demand (torch needs most of
   the GPU for the backbone).
2. Each image is loaded as DUSt3R's ``load_images`` does at the checkpoint's ``imsize`` (long side resized,
   centre crop to multiples of 16, RGB scaled to [-1, 1]), in this process (threads, never forked workers: JAX
   may be running already), and goes through the backbone in torch.
3. The backbone features pass to JAX (DLPack, without a host copy, when both are on the GPU), the head keeps the
   ``nfeat`` local features of largest attention, and jasmk indexes all images and queries them against
   themselves with MASt3R's ASMK parameters (:data:`ASMK_PARAMS`: ASMK*, no idf, one word per indexed feature,
   five per query feature, ``alpha = 3``, threshold 0, all images ranked).

The backbone (``backbone=``) is either

* a MASt3R/DUSt3R model (anything with ``_encode_image(img, true_shape)``, e.g. ``AsymmetricMASt3R``): it is
  moved to ``device`` and called as MASt3R's ``RetrievalModel`` does; or
* any callable ``backbone(images) -> features`` with ``images`` a ``[B, 3, H, W] float32`` torch tensor on
  ``device`` (RGB in [-1, 1], ``H`` and ``W`` multiples of 16, the long side ``imsize``; the ``B`` images of a
  call share their size) and ``features`` ``[B, N, C]`` (a torch tensor on any device, a numpy array or a JAX
  array; floating point, ``C`` the head's backbone dimension); or
* None: MASt3R's ``AsymmetricMASt3R.from_pretrained(args.pretrained)`` of the checkpoint, if ``mast3r`` is
  importable.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os

import jax
import numpy as np

from . import api
from .core import engine, runtime, validate
from .core import ivf as ivf_mod
from .head import model as head_mod
from .storage import asmk_format, atomic, paths

log = logging.getLogger(__name__)

#: The asmk parameters MASt3R's Retriever uses (its ``asmk_params``; the codebook size comes from the checkpoint).
ASMK_PARAMS = {
    "binary": True,               # build_ivf.kernel.binary: ASMK*
    "use_idf": False,             # build_ivf.ivf.use_idf
    "index_multiple_assignment": 1,   # build_ivf.quantize.multiple_assignment
    "query_multiple_assignment": 5,   # query_ivf.quantize.multiple_assignment
    "alpha": 3.0,                 # query_ivf.similarity.alpha
    "similarity_threshold": 0.0,  # query_ivf.similarity.similarity_threshold
}

#: File name endings MASt3R's Retriever takes from a folder (case-sensitive, as there).
IMAGE_EXTENSIONS = ("png", "jpg", "PNG", "JPG")

PATCH_SIZE = 16


# ---------------------------------------------------------------------------------------------------------
# image lists and images


def image_paths(input_imdir_or_imlistfile) -> list:
    """The images MASt3R's Retriever would read: a folder's ``.png``/``.jpg`` files (sorted by name), the lines of
    a list file (``#`` comments and empty lines skipped), or a list of images as given (paths, or the in-memory
    images :func:`load_image` takes)."""
    if isinstance(input_imdir_or_imlistfile, (str, os.PathLike)):
        where = os.fspath(input_imdir_or_imlistfile)
        if os.path.isfile(where):
            with open(where) as handle:
                paths = [line for line in handle.read().splitlines() if line and not line.startswith("#")]
        elif os.path.isdir(where):
            paths = [os.path.join(where, f) for f in sorted(os.listdir(where))
                     if any(f.endswith(ext) for ext in IMAGE_EXTENSIONS)]
        else:
            raise ValueError(f"{where} is neither a folder of images nor a file listing image paths")
    elif isinstance(input_imdir_or_imlistfile, (list, tuple)):
        paths = [os.fspath(p) if isinstance(p, os.PathLike) else p for p in input_imdir_or_imlistfile]
    elif hasattr(input_imdir_or_imlistfile, "__getitem__") and hasattr(input_imdir_or_imlistfile, "__len__"):
        paths = _Items(input_imdir_or_imlistfile)  # a torch Dataset (or any sequence): items read when needed
    else:
        raise ValueError("give a folder, a file listing image paths, a list of images (paths or arrays) or a "
                         f"dataset of them; got {type(input_imdir_or_imlistfile).__name__}")
    if not len(paths):
        raise ValueError(f"no images found in {input_imdir_or_imlistfile!r}")
    return paths


class _Items:
    """A dataset's items in order (``len`` and indexing; read one at a time)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


def load_image(path, imsize: int, *, patch_size: int = PATCH_SIZE):
    """One image as DUSt3R's ``load_images(size=imsize)`` prepares it (the long-side branch, ``imsize != 224``).

    ``path`` is an image file, or an image in memory: a PIL image, an ``[H, W, 3]`` uint8 RGB array (numpy or
    torch), which are prepared the same way; a float torch tensor ``[3, H, W]`` or ``[1, 3, H, W]`` (or a dict with
    it as ``"img"``, an item of DUSt3R's ``load_images``) is taken as already prepared (values in [-1, 1], ``H``
    and ``W`` multiples of ``patch_size``).

    EXIF orientation applied, RGB; the long side resized to ``imsize`` (Lanczos when shrinking, bicubic
    otherwise); a centre crop to multiples of ``patch_size`` (a square image is cropped to 4:3); values mapped to
    [-1, 1] by ``(x / 255 - 0.5) / 0.5``.

    Returns:
        ``[1, 3, H, W] float32`` torch tensor (CPU, or the device of a prepared tensor).
    """
    import PIL.Image
    import PIL.ImageOps
    import torch

    if isinstance(path, dict) and "img" in path:
        path = path["img"]
    if isinstance(path, torch.Tensor) and path.is_floating_point():
        t = path[None] if path.ndim == 3 else path
        if t.ndim != 4 or t.shape[:2] != (1, 3) or t.shape[2] % patch_size or t.shape[3] % patch_size:
            raise ValueError(f"a prepared image must be a [1, 3, H, W] float tensor with H and W multiples of "
                             f"{patch_size}, got shape {tuple(path.shape)}")
        return t.to(torch.float32)
    if isinstance(path, PIL.Image.Image):
        img, name = PIL.ImageOps.exif_transpose(path).convert("RGB"), "the image"
    elif isinstance(path, (np.ndarray, torch.Tensor)):
        a = path.numpy() if isinstance(path, torch.Tensor) else path
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"an image array must be [H, W, 3] uint8 RGB, got shape {a.shape} {a.dtype}")
        img, name = PIL.Image.fromarray(np.ascontiguousarray(a)), "the image array"
    elif isinstance(path, (str, os.PathLike)):
        name = os.fspath(path)
        try:
            with PIL.Image.open(path) as im:
                img = PIL.ImageOps.exif_transpose(im).convert("RGB")
        except (OSError, PIL.UnidentifiedImageError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from exc
    else:
        raise ValueError(f"an image must be a path, a PIL image, an [H, W, 3] uint8 array or a prepared float "
                         f"tensor, got {type(path).__name__}")
    longest = max(img.size)
    interp = PIL.Image.LANCZOS if longest > imsize else PIL.Image.BICUBIC
    img = img.resize(tuple(int(round(x * imsize / longest)) for x in img.size), interp)
    w, h = img.size
    cx, cy = w // 2, h // 2
    halfw = ((2 * cx) // patch_size) * patch_size / 2
    halfh = ((2 * cy) // patch_size) * patch_size / 2
    if w == h:
        halfh = 3 * halfw / 4
    img = img.crop((cx - halfw, cy - halfh, cx + halfw, cy + halfh))
    if min(img.size) < patch_size:
        raise ValueError(f"image {name} is too thin: {img.size[0]}x{img.size[1]} after resizing to {imsize}")
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return arr.to(torch.float32).div(255).sub(0.5).div(0.5)[None]


def _prefetched(paths, imsize, num_workers):
    """Yield ``load_image`` of each path in order; ``num_workers`` threads read ahead (no process is forked)."""
    if num_workers <= 0:
        for p in paths:
            yield load_image(p, imsize)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="jasmk-images") as ex:
        pending = collections.deque()
        it = iter(paths)
        for p in it:
            pending.append(ex.submit(load_image, p, imsize))
            if len(pending) >= 2 * num_workers:
                break
        while pending:
            img = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(load_image, nxt, imsize))
            yield img


# ---------------------------------------------------------------------------------------------------------
# torch -> JAX


def _jax_on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def features_to_jax(features):
    """Backbone features as an array the head takes: a CUDA torch tensor becomes a JAX array on the same GPU
    through DLPack (no host copy) when JAX runs on GPUs; other torch tensors go through numpy; numpy and JAX
    arrays pass as they are. Floating-point torch tensors are made float32 first (on their device)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - the Retriever needs torch anyway
        torch = None
    if torch is not None and isinstance(features, torch.Tensor):
        t = features.detach()
        if not t.is_floating_point():
            raise ValueError(f"backbone features must be floating point, got torch dtype {t.dtype}")
        t = t.to(torch.float32)
        if t.is_cuda and _jax_on_gpu():
            import jax.dlpack

            return jax.dlpack.from_dlpack(t.contiguous())
        return t.cpu().numpy()
    return features


def padded_features(features):
    """``(features padded to the head's token ladder, real token count)`` for backbone features ``[B, N, C]``:
    a torch tensor is padded in torch (on its device) before it goes to JAX (:func:`features_to_jax`), so that
    frames of other sizes compile nothing in JAX; a numpy array is padded by the head, a JAX array as it is (the
    head pads it where it lies). The count is None where nothing was padded."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(features, torch.Tensor) and features.ndim == 3 and features.shape[1] >= 1:
        n = int(features.shape[1])
        cap = head_mod.token_capacity(n)
        t = features.detach()
        if cap != n:
            t = torch.nn.functional.pad(t, (0, 0, 0, cap - n))
        return features_to_jax(t), n
    return features_to_jax(features), None


# ---------------------------------------------------------------------------------------------------------
# backbones


class _Mast3rBackbone:
    """A MASt3R/DUSt3R model called as MASt3R's ``RetrievalModel`` does: ``_encode_image(img, true_shape)[0]``."""

    def __init__(self, model):
        self.model = model

    def __call__(self, images):
        import torch

        b, _, h, w = images.shape
        true_shape = torch.tensor([[h, w]] * b, dtype=torch.int32, device=images.device)
        return self.model._encode_image(images, true_shape=true_shape)[0]


def _pretrained_mast3r(pretrained, device):
    try:
        from mast3r.model import AsymmetricMASt3R
    except ImportError as exc:
        raise ValueError("no backbone given and MASt3R is not importable: pass backbone= (a MASt3R model or a "
                         "callable images -> [B, N, C] features) or install mast3r") from exc
    if not pretrained:
        raise ValueError("no backbone given and the checkpoint names no pretrained MASt3R model (args.pretrained)")
    log.info("loading the MASt3R backbone %s", pretrained)
    return AsymmetricMASt3R.from_pretrained(pretrained)


def _check_device(device, *, cpu_fallback: bool = False):
    """``device`` as a torch device; a CUDA device where torch has none is an error, or with ``cpu_fallback``
    the CPU (logged)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cuda' or 'cpu', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        if not cpu_fallback:
            raise ValueError(f"device {device!r} asked for but torch sees no CUDA GPU: pass device='cpu'")
        log.info("device %r asked for but torch sees no CUDA GPU: running on the CPU", device)
        return torch.device("cpu")
    return dev


# ---------------------------------------------------------------------------------------------------------
# the Retriever


class Retriever:
    """MASt3R's retrieval ``Retriever`` on jasmk (see the module doc).

    Args:
        modelname: path of the retrieval checkpoint (``.pth`` in MASt3R's format); the codebook pickle lies beside
            it (:func:`jasmk.head.mast3r_codebook_path`).
        backbone: a MASt3R model, a callable ``images [B, 3, H, W] -> features [B, N, C]`` (module doc), or None
            for the checkpoint's pretrained MASt3R (needs ``mast3r``).
        device: torch device of the images and the backbone (``"cuda"`` as in MASt3R, or ``"cpu"``).
        batch_size: images per backbone call (MASt3R: 1); a batch only holds consecutive images of one size.
        num_workers: threads reading images ahead (0: read in the calling thread).
        progress: show a progress bar on stderr.

    Raises:
        ValueError: a missing or malformed checkpoint or codebook, a codebook that does not fit the checkpoint,
            an unusable backbone or device.
    """

    #: a CUDA ``device`` where torch has none: an error (False), or the CPU, logged (True)
    CPU_FALLBACK = False

    def __init__(self, modelname, backbone=None, device="cuda", *, batch_size: int = 1, num_workers: int = 0,
                 progress: bool = False):
        runtime.share_gpu_with_torch()  # before anything can start JAX
        modelname = os.fspath(modelname)
        if not os.path.isfile(modelname):
            raise ValueError(f"retrieval checkpoint {modelname} does not exist")
        for value, name, low in ((batch_size, "batch_size", 1), (num_workers, "num_workers", 0)):
            if not validate.is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.batch_size, self.num_workers, self.progress = int(batch_size), int(num_workers), bool(progress)
        self.device = _check_device(device, cpu_fallback=self.CPU_FALLBACK)
        args, state = head_mod.read_mast3r_checkpoint(modelname)
        get = head_mod.args_getter(args)

        # the backbone
        backbone = self._resolve_backbone(backbone, get("pretrained"))

        # the codebook (a Codebook holds numpy centroids: no device is touched)
        self.codebook_path = head_mod.mast3r_codebook_path(modelname)
        cb_state = asmk_format.read_pickle(self.codebook_path)
        centroids = self._check_codebook_state(cb_state, get("nclusters"))
        self._codebook = asmk_format.codebook_from_state(cb_state)

        # the head: its input dim from the weights, else the backbone's, else (identity head) the codebook's
        backbone_dim = None
        if head_mod.infer_backbone_dim(state, args) is None and get("backbone_dim") is None:
            backbone_dim = getattr(backbone, "enc_embed_dim", None)
            if backbone_dim is None and not head_mod.parse_hdims(get("hdims", "") or ""):
                backbone_dim = int(centroids.shape[1])
        self.config, self._host_variables, info = head_mod.head_from_mast3r(args, state, backbone_dim=backbone_dim,
                                                                            source=modelname)
        edim = getattr(backbone, "enc_embed_dim", None)
        if isinstance(edim, (int, np.integer)) and int(edim) != self.config.backbone_dim:
            raise ValueError(f"the backbone gives {edim}-channel features but {modelname} is for "
                             f"{self.config.backbone_dim}-channel ones")
        if centroids.shape[1] != self.config.dim:
            raise ValueError(f"the codebook {self.codebook_path} holds {centroids.shape[1]}-dim words but the head "
                             f"of {modelname} gives {self.config.dim}-dim features")
        imsize = info["imsize"]
        if not validate.is_int(imsize) or imsize < PATCH_SIZE:
            raise ValueError(f"checkpoint args.imsize must be an int >= {PATCH_SIZE}, got {imsize!r}")
        if imsize == 224:
            raise ValueError("checkpoint args.imsize is 224: MASt3R's retrieval reads images at 512 only")
        self.imsize = int(imsize)
        self._variables = None
        log.info("retriever: head %s, codebook %s (%d words)", self.config, self.codebook_path, centroids.shape[0])

    def _resolve_backbone(self, backbone, pretrained):
        """Set ``self._backbone`` (a callable images -> features) from ``backbone``; return the model given (or
        loaded), whose ``enc_embed_dim`` the head is checked against."""
        if backbone is None:
            backbone = _pretrained_mast3r(pretrained, self.device)
        if hasattr(backbone, "_encode_image"):
            if hasattr(backbone, "to"):
                backbone = backbone.to(self.device)
            if hasattr(backbone, "eval"):
                backbone.eval()
            self._backbone = _Mast3rBackbone(backbone)
        elif callable(backbone):
            self._backbone = backbone
        else:
            raise ValueError(f"backbone must be a MASt3R model or a callable images -> [B, N, C] features, got "
                             f"{type(backbone).__name__}")
        return backbone

    @staticmethod
    def _check_codebook_state(state, nclusters) -> np.ndarray:
        """The centroids of asmk's codebook pickle content, checked on the host (no device is touched)."""
        if not isinstance(state, dict) or state.get("type") != "Codebook" or not isinstance(state.get("state"), dict):
            raise ValueError("the codebook file is not an asmk codebook state (expected type 'Codebook')")
        centroids = state["state"].get("centroids")
        if centroids is None:
            raise ValueError("the codebook holds no centroids (it was never trained)")
        c = np.asarray(centroids)
        if c.ndim != 2 or c.shape[0] < 1 or not np.issubdtype(c.dtype, np.floating):
            raise ValueError(f"codebook centroids must be a non-empty [K, D] float array, got {c.shape} {c.dtype}")
        size = (state.get("params") or {}).get("size")
        if nclusters is not None and size != nclusters:  # asmk asserts the cached params equal MASt3R's
            raise ValueError(f"the codebook was made with size {size!r} but the checkpoint asks for "
                             f"nclusters={nclusters!r}")
        return c

    # -- lazy JAX state ------------------------------------------------------------------------------------

    def _start(self):
        """Head variables and the jitted head on the device (JAX starts here)."""
        if self._variables is not None:
            return
        self._variables = head_mod.device_variables(self._host_variables)  # whitening stays float64

    # -- steps ---------------------------------------------------------------------------------------------

    def _batches(self, paths):
        """``(first index, images [B, 3, H, W])`` of consecutive same-size images, at most ``batch_size``."""
        import torch

        buf, start = [], 0
        for i, img in enumerate(_prefetched(paths, self.imsize, self.num_workers)):
            if buf and (len(buf) == self.batch_size or buf[-1].shape != img.shape):
                yield start, torch.cat(buf)
                buf, start = [], i
            buf.append(img)
        if buf:
            yield start, torch.cat(buf)

    def local_features(self, paths):
        """Local descriptors of the images, as MASt3R's ``extract_local_features`` gives them.

        Returns:
            ``(feats [M, dim] float32, ids [M] int64)``: each image's kept features (by decreasing attention),
            image after image; ``ids`` is the image's position in ``paths``.
        """
        import torch
        from tqdm.auto import tqdm

        self._start()
        feats, ids = [], []
        with torch.no_grad(), tqdm(total=len(paths), desc="retrieval features", unit="img",
                                   disable=not self.progress, leave=False) as bar:
            for start, images in self._batches(paths):
                images = images.to(self.device, non_blocking=True)
                out, n_tokens = padded_features(self._backbone(images))
                shape = tuple(getattr(out, "shape", ()))
                if len(shape) != 3 or shape[0] != images.shape[0]:
                    raise ValueError(f"the backbone must return [B, N, C] features for B = {images.shape[0]} images, "
                                     f"got shape {shape}")
                feat, _, _ = head_mod.local_descriptors(self._variables, self.config, out,  # a compile per token step
                                                        n_tokens=n_tokens)
                feat = np.asarray(feat, np.float32)
                for j in range(feat.shape[0]):
                    feats.append(feat[j])
                    ids.append(np.full(feat.shape[1], start + j, np.int64))
                bar.update(images.shape[0])
        feats = np.concatenate(feats)
        if feats.shape[0] == 0:
            raise ValueError(f"the head keeps no local features (nfeat={self.config.nfeat!r}: MASt3R keeps "
                             "int(nfeat) per image, or the fraction -nfeat of the tokens when nfeat < 0)")
        return feats, np.concatenate(ids)

    def scores(self, feats, ids, n_images: int) -> np.ndarray:
        """MASt3R's score matrix for local descriptors: index them all, query them all (:data:`ASMK_PARAMS`).

        Returns:
            ``[n_images, n_images] float64``, ``[query, database]``.
        """
        self._start()
        p = ASMK_PARAMS
        ma_q = p["query_multiple_assignment"]
        # quantize once with the query's MA: the index's single word is the nearest of those
        words = api.quantize(self._codebook, feats, multiple_assignment=ma_q, method="exact")  # asmk's assignment
        index = api.build_index(feats, ids, codebook=self._codebook, binary=p["binary"], use_idf=p["use_idf"],
                                multiple_assignment=p["index_multiple_assignment"],
                                word_ids=words[:, :p["index_multiple_assignment"]])
        s = api.score_matrix(index, feats, ids, multiple_assignment=ma_q, alpha=p["alpha"],
                             similarity_threshold=p["similarity_threshold"], word_ids=words)
        if s.shape != (n_images, n_images):
            raise ValueError(f"some images kept no local features: got a {s.shape} score matrix for {n_images} "
                             "images")
        return s.astype(np.float64)

    def __call__(self, input_imdir_or_imlistfile, outfile=None) -> np.ndarray:
        """Score every image against every other, as MASt3R's Retriever does.

        Args:
            input_imdir_or_imlistfile: a folder (its ``.png``/``.jpg`` files, sorted), a file listing image paths,
                a list of images (paths, PIL images, ``[H, W, 3]`` uint8 arrays, prepared tensors: see
                :func:`load_image`), or a dataset of them (a torch ``Dataset``: ``len`` and indexing).
            outfile: optional ``.npy`` path to save the matrix to.

        Returns:
            ``[n, n] float64`` ASMK* similarities, ``scores[query, database]`` in the order of the images: what
            MASt3R's ``make_pairs(..., sim_mat=scores)`` expects.
        """
        if outfile is not None:
            _check_npy_out(outfile)  # before the work, not after
        paths = image_paths(input_imdir_or_imlistfile)
        log.info("retrieval on %d images", len(paths))
        feats, ids = self.local_features(paths)
        scores = self.scores(feats, ids, len(paths))
        if outfile is not None:
            _save_npy(outfile, scores)
            log.info("score matrix saved in %s", outfile)
        return scores


# ---------------------------------------------------------------------------------------------------------
# MASt3R-SLAM's keyframe database


class RetrievalDatabase(Retriever):
    """MASt3R-SLAM's keyframe retrieval database (``mast3r_slam.retrieval_database.RetrievalDatabase``) on jasmk:
    the same constructor, :meth:`update`, :attr:`kf_counter` and :attr:`kf_ids`, without asmk or mast3r.

    MASt3R-SLAM switches with one line in ``mast3r_slam/mast3r_utils.py`` (docs/mast3r.md)::

        from jasmk.mast3r import RetrievalDatabase   # instead of: from mast3r_slam.retrieval_database import ...

    Each keyframe's backbone features (``frame.feat``, ``[1, N, C]``: a torch tensor, CUDA or not, a numpy or a
    JAX array) go through the retrieval head (:meth:`prep_features`), their ``nfeat`` local features are assigned
    to words as MASt3R-SLAM assigns them (float32 squared distances ``|x|^2 + |c|^2 - 2 x.c``, five nearest words
    for a query, the nearest one for the database), and the keyframe is scored against every keyframe added
    before it with MASt3R's ASMK* parameters (:data:`ASMK_PARAMS`). Keyframe ids are the order of addition
    (``0, 1, 2, ...``), as MASt3R-SLAM's own counter numbers them.

    Args:
        modelname: the retrieval checkpoint (``.pth``), the codebook beside it (as :class:`Retriever`).
        backbone: the MASt3R model (optional: the database never runs it; it is kept for calls on images, which
            the :class:`Retriever` methods make).
        device: torch device of that backbone. ``"cuda"`` on a machine where torch has no CUDA GPU is not an
            error: the database runs on the CPU (logged). jasmk itself runs on JAX's default device; with torch
            on the GPU too, JAX is told to allocate GPU memory on demand (in every process, MASt3R-SLAM's spawned
            backend included, provided the database is made before JAX starts there).
        reserve: keyframes to reserve room for (:func:`jasmk.reserve`, made at the first keyframe): with the XLA
            kernels (GPU), the kernels of every reserved segment shape are compiled in a background thread from
            the first keyframe on, and a run within the reservation compiles nothing once that is done. None:
            grow as needed (a compilation per new segment shape, logged). On the CPU the compiled CPU kernel
            scores ASMK* and nothing is compiled either way.
    """

    CPU_FALLBACK = True  # the database does not need a GPU: it only moves a backbone given to it there

    def __init__(self, modelname, backbone=None, device="cuda", *, reserve: int | None = 4096):
        super().__init__(modelname, backbone=backbone, device=device)
        self.kf_counter = 0
        self.kf_ids = []
        if reserve is not None and (not validate.is_int(reserve) or reserve < 1):
            raise ValueError(f"reserve must be a positive int (keyframes) or None, got {reserve!r}")
        self._reserve = None if reserve is None else int(reserve)
        self._index = None
        self._warming = None

    def wait_until_warm(self, timeout: float | None = None) -> bool:
        """Wait for the background compilation of the reserved shapes' kernels (started by the first keyframe);
        True when it is done (or there is none)."""
        if self._warming is not None:
            self._warming.join(timeout)
            return not self._warming.is_alive()
        return True

    def _resolve_backbone(self, backbone, pretrained):
        if backbone is None:  # the database never needs one: calls on images then say so
            self._backbone = _no_backbone
            return None
        return super()._resolve_backbone(backbone, pretrained)

    @property
    def index(self):
        """The keyframes' :class:`jasmk.Index` (None before the first keyframe is added): save it with
        :func:`jasmk.save_index`; image ids are the keyframe ids."""
        return self._index

    def prep_features(self, backbone_feat):
        """The head's local features of one keyframe's backbone features (MASt3R-SLAM's ``prep_features``).

        Args:
            backbone_feat: ``[1, N, C]`` torch tensor (any device), numpy or JAX array.

        Returns:
            ``[1, k, dim] float32`` JAX array, computed before this returns (the caller may overwrite its input).
        """
        self._start()
        x, n_tokens = padded_features(backbone_feat)
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 3 or shape[0] != 1:
            raise ValueError(f"keyframe features must be [1, N, C] (one frame at a time), got shape {shape}")
        feat, _, _ = head_mod.local_descriptors(self._variables, self.config, x, n_tokens=n_tokens)
        return feat.block_until_ready()

    def _words(self, feats: np.ndarray, ma: int) -> np.ndarray:
        """MASt3R-SLAM's word assignment: the ``ma`` nearest words by float32 expanded squared distance."""
        return api.quantize(self._codebook, feats, multiple_assignment=ma, method="jax")

    def update(self, frame, add_after_query, k, min_thresh=0.0):
        """Query the database with one keyframe, then add it if ``add_after_query``.

        Args:
            frame: an object whose ``feat`` is the keyframe's ``[1, N, C]`` backbone features (MASt3R-SLAM's Frame).
            add_after_query: add the keyframe (id :attr:`kf_counter`) after querying.
            k: most keyframes returned.
            min_thresh: only keyframes scoring above this are returned.

        Returns:
            ``list[int]``: ids of the best ``min(k, kf_counter)`` keyframes added before, best first (equal scores:
            lower id first), those scoring at most ``min_thresh`` left out. Empty for the first keyframe.
        """
        if not validate.is_int(k) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        thresh = validate.finite_number(min_thresh, "min_thresh")
        if not hasattr(frame, "feat"):
            raise ValueError(f"frame must have the keyframe's backbone features as .feat, got "
                             f"{type(frame).__name__}")
        feats = np.asarray(self.prep_features(frame.feat)[0], np.float32)
        if feats.shape[0] == 0:
            raise ValueError(f"the head keeps no local features of this frame (nfeat={self.config.nfeat!r})")
        p = ASMK_PARAMS
        kf_id = self.kf_counter
        ids = np.full(feats.shape[0], kf_id, np.int64)
        found, words = [], None
        if kf_id > 0:
            words = self._words(feats, p["query_multiple_assignment"])
            agg = api.aggregate_images(self._codebook, feats, ids, binary=True,
                                       multiple_assignment=p["query_multiple_assignment"], word_ids=words)
            scores = api.score_matrix_aggregated(self._index, agg, alpha=p["alpha"],
                                                 similarity_threshold=p["similarity_threshold"])[0]
            top = np.argsort(-scores, kind="stable")[:min(int(k), scores.shape[0])]
            found = [int(i) for i in top if scores[i] > thresh]
        if add_after_query:
            ma = p["index_multiple_assignment"]
            words = self._words(feats, ma) if words is None else words[:, :ma]
            agg = api.aggregate_images(self._codebook, feats, ids, binary=True, multiple_assignment=ma,
                                       word_ids=words)
            if self._index is None:
                self._index = ivf_mod.empty(self._codebook.centroids, binary=p["binary"], use_idf=p["use_idf"],
                                            codebook_size_param=self._codebook.size_param)
                if self._reserve is not None:
                    self._index = api.reserve(self._index, images=self._reserve, warm=False,
                                              postings=self._reserve * feats.shape[0] * ma)
                    reserved = self._index
                    self._warming = runtime.in_background(
                        lambda: engine.warm_up(reserved, n_queries=(1,), kernel="auto"), name="jasmk-slam-warm-up")
            self._index = ivf_mod.add(self._index, agg)
            self.kf_ids.append(kf_id)
            self.kf_counter += 1
        return found


def _no_backbone(images):
    raise ValueError("this RetrievalDatabase was made without a backbone: pass backbone= to compute features of "
                     "images (update() takes the keyframe's features and needs none)")


def _check_npy_out(path) -> str:
    """``path`` if a ``.npy`` may be written there (:func:`jasmk.storage.paths.check_file_target`)."""
    return paths.check_file_target(path, magic=paths.NPY_MAGIC, what=".npy array", name="outfile")


def _save_npy(path, array) -> None:
    """Write ``array`` to the ``.npy`` file ``path`` atomically (temp file, fsync, rename); an existing file is
    replaced only if it is itself a ``.npy`` array (checked before the work is lost: nothing else is overwritten)."""
    atomic.write_bytes_with(_check_npy_out(path), lambda handle: np.save(handle, array), suffix=".npy")

__all__ = ["ASMK_PARAMS", "IMAGE_EXTENSIONS", "PATCH_SIZE", "RetrievalDatabase", "Retriever", "features_to_jax",
           "image_paths", "load_image", "padded_features"]
