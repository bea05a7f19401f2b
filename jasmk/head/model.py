"""The MASt3R/HOW retrieval head in Flax: prewhiten -> projector MLP -> attention -> postwhiten.

The head maps backbone features ``[..., N, C]`` to local descriptors for ASMK (``forward_local``: the ``nfeat``
features of largest attention) or to a global descriptor (``forward_global``: weighted SPoC). Attention is the
L2 norm of the projected features, taken before post-whitening. Whitening statistics live in the
``"whitening"`` variable collection, apart from the trainable ``"params"``, so optimizers never touch them.

``load_mast3r_checkpoint`` converts a MASt3R retrieval checkpoint (torch ``.pth``) into a config and Flax
variables (host arrays: loading touches no device); torch is needed only for that (``pip install jasmk[torch]``).
``mast3r_codebook_path`` finds the ASMK codebook MASt3R keeps beside the checkpoint.

Precision is MASt3R's: the whitening (``m``, ``P`` and ``(x - m) P``) is float64, the projector, attention and
selection are float32, and every matrix product runs at ``jax.lax.Precision.HIGHEST`` (JAX's default float32
matmul on NVIDIA GPUs is TF32, which MASt3R's torch head does not use). Whitening variables are float64 in every
form the head is kept in (MASt3R ``.pth`` import, :func:`save_head` / :func:`load_head`); put them on the device
with :func:`device_variables`, which keeps them float64 without turning on ``jax_enable_x64``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..core import ivf, runtime, validate
from ..storage import checkpoint
from . import selection, whiten
from .selection import resolve_nfeat

log = logging.getLogger(__name__)

HIGHEST = jax.lax.Precision.HIGHEST

#: token-count ladder steps per octave (:func:`token_capacity`)
TOKEN_STEPS = 4

#: A float32 whitening whose condition number exceeds this loses more than ~1e-4 relative accuracy
#: (float32 rounding, 6e-8, times the condition number): :func:`load_head` warns about it.
ILL_CONDITIONED = 1e3


class WhiteningPrecisionWarning(UserWarning):
    """The head's whitening is not float64, so its results differ from MASt3R's."""


def parse_hdims(hdims) -> tuple[int, ...]:
    """Projector dims from MASt3R's ``"1024_1024"`` string (``""``: identity) or a sequence of ints."""
    if hdims is None or hdims == "":
        return ()
    if isinstance(hdims, str):
        try:
            dims = tuple(int(h) for h in hdims.split("_"))
        except ValueError:
            raise ValueError(f"hdims must look like '1024_1024' or '', got {hdims!r}") from None
    else:
        dims = tuple(int(h) for h in hdims)
    if any(h < 1 for h in dims):
        raise ValueError(f"hdims must be positive, got {hdims!r}")
    return dims


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Static configuration of the retrieval head (the MASt3R ``RetrievalModel`` arguments).

    Attributes:
        backbone_dim: channel count ``C`` of the backbone features.
        hdims: projector dims; ``()`` for no projector.
        residual: add the (pre-whitened) input to the projector output (needs ``hdims[-1] == backbone_dim``).
        prewhiten: whiten backbone features first.
        postwhiten: whiten projected features last.
        featweights: attention kind; only ``"l2norm"``.
        nfeat: local features kept by ``forward_local``: ``int(nfeat)`` for ``nfeat >= 0`` (0 <= nfeat < 1 keeps
            none, as in MASt3R), a fraction ``int(-nfeat * N)`` of the ``N`` tokens for ``-1 <= nfeat < 0``.
    """

    backbone_dim: int
    hdims: tuple = (1024,)
    residual: bool = False
    prewhiten: bool = False
    postwhiten: bool = False
    featweights: str = "l2norm"
    nfeat: float = 300

    def __post_init__(self):
        object.__setattr__(self, "hdims", parse_hdims(self.hdims))
        if int(self.backbone_dim) < 1:
            raise ValueError(f"backbone_dim must be positive, got {self.backbone_dim}")
        if self.featweights != "l2norm":
            raise ValueError(f"featweights {self.featweights!r} is not supported (only 'l2norm')")
        if self.residual and (not self.hdims or self.hdims[-1] != self.backbone_dim):
            raise ValueError(f"a residual projector needs hdims[-1] == backbone_dim ({self.backbone_dim}), "
                             f"got hdims {self.hdims}")
        resolve_nfeat(self.nfeat, 1 << 30)  # validates the value

    @property
    def dim(self) -> int:
        """Output descriptor dimension."""
        return self.hdims[-1] if self.hdims else self.backbone_dim


def _zeros64(shape):
    with runtime.float64():
        return jnp.zeros(shape, jnp.float64)


def _eye64(n):
    with runtime.float64():
        return jnp.eye(n, dtype=jnp.float64)


class Whitener(nn.Module):
    """``(x - m) @ p`` in float64 with ``m [1, dim] float64`` and ``p [dim, dim] float64`` in the ``"whitening"``
    collection (identity at init); the output has ``x``'s dtype (:func:`jasmk.whiten.whiten`)."""

    dim: int

    @nn.compact
    def __call__(self, x):
        m = self.variable("whitening", "m", _zeros64, (1, self.dim))
        p = self.variable("whitening", "p", _eye64, self.dim)
        if m.value.dtype != np.float64 or p.value.dtype != np.float64:
            warnings.warn(
                f"the head's whitening reached it as {p.value.dtype}, not float64: its features differ from "
                "MASt3R's (a float64 numpy array passed to a jitted function becomes float32 unless "
                "jax_enable_x64 is on); pass the variables through jasmk.head.device_variables first",
                WhiteningPrecisionWarning, stacklevel=2)
        return whiten.whiten(x, m.value, p.value)


def _none_kept(lead, dim, feat_dtype, attn_dtype):
    """``forward_local``'s output when ``nfeat`` keeps no feature (MASt3R's ``0 <= nfeat < 1``): empty arrays."""
    return (jnp.zeros(tuple(lead) + (0, dim), feat_dtype), jnp.zeros(tuple(lead) + (0,), attn_dtype),
            jnp.zeros(tuple(lead) + (0,), jnp.int32))


class RetrievalHead(nn.Module):
    """The retrieval head; ``__call__`` is ``forward_global``."""

    config: HeadConfig

    def setup(self):
        cfg = self.config
        self.prewhiten = Whitener(cfg.backbone_dim) if cfg.prewhiten else None
        self.postwhiten = Whitener(cfg.dim) if cfg.postwhiten else None
        self.linears = [nn.Dense(h, precision=HIGHEST, name=f"linear_{i}") for i, h in enumerate(cfg.hdims)]
        self.norms = [nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=f"norm_{i}")
                      for i in range(len(cfg.hdims) - 1)]

    def project(self, x):
        """Backbone features ``[..., N, C]`` -> (pre-whitened input, projected features ``[..., N, dim]``)."""
        if x.shape[-1] != self.config.backbone_dim:
            raise ValueError(f"features have {x.shape[-1]} channels, the head expects {self.config.backbone_dim}")
        xw = self.prewhiten(x) if self.prewhiten is not None else x
        h = xw
        for i, lin in enumerate(self.linears):
            h = lin(h)
            if i < len(self.norms):
                h = nn.gelu(self.norms[i](h), approximate=False)
        if self.config.residual:
            h = h + xw
        return xw, h

    def features_and_attention(self, x):
        """``(features [..., N, dim], attention [..., N])``: attention from the projected features, then
        post-whitening."""
        _, h = self.project(x)
        attn = selection.attention_l2(h)
        feat = self.postwhiten(h) if self.postwhiten is not None else h
        return feat, attn

    def forward_local(self, x):
        """The ``nfeat`` local features of largest attention (:func:`resolve_nfeat`), by decreasing attention:
        ``(feat [..., k, dim] float32, attn [..., k] float32, idx [..., k] int32)``."""
        feat, attn = self.features_and_attention(x)
        k = resolve_nfeat(self.config.nfeat, feat.shape[-2])
        if k == 0:
            return _none_kept(feat.shape[:-2], feat.shape[-1], feat.dtype, attn.dtype)
        return selection.how_select_local(feat, attn, nfeat=k)

    def forward_global(self, x):
        """Weighted SPoC global descriptor ``[..., dim]``."""
        feat, attn = self.features_and_attention(x)
        return selection.weighted_spoc(feat, attn)

    def __call__(self, x):
        return self.forward_global(x)


def init_head(config: HeadConfig, *, seed: int = 0):
    """Fresh variables ``{"params": ..., "whitening": ...}`` for ``config`` (whitening = identity, float64)."""
    model = RetrievalHead(config)
    return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1, config.backbone_dim), jnp.float32))


def device_variables(variables, device=None):
    """Head variables as JAX arrays on ``device`` (the default device if None), the whitening kept float64.

    Pass the result to jitted functions of the head: JAX casts float64 numpy arguments of a jitted function to
    float32 when ``jax_enable_x64`` is off, but keeps float64 JAX arrays. The ``"whitening"`` collection becomes
    float64 (an older float32 whitening is widened, not made more accurate); everything else keeps its dtype.
    """
    variables = dict(variables)
    whitening = variables.pop("whitening", None)
    out = jax.device_put(variables, device)
    if whitening is not None:
        with runtime.float64():
            out["whitening"] = jax.device_put(
                jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), whitening), device)
    return out


def _checked(x, config: HeadConfig):
    """``x`` checked (shape, dtype, finite values), where it lies: a JAX array stays on its device (one scalar
    comes back to the host), anything else becomes a numpy array."""
    if isinstance(x, jax.Array):
        shape, a = tuple(x.shape), x
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"backbone features must be floating point, got dtype {a.dtype}")
    else:
        a = np.asarray(x)
        shape = a.shape
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"backbone features must be numeric, got dtype {a.dtype}")
    if len(shape) < 2 or shape[-1] != config.backbone_dim:
        raise ValueError(f"backbone features must be [..., N, {config.backbone_dim}], got shape {shape}")
    finite = bool(jnp.isfinite(a).all()) if isinstance(a, jax.Array) else bool(np.isfinite(a).all())
    if not finite:
        raise ValueError("backbone features contain NaN or inf values")
    return a


def check_features(x, config: HeadConfig):
    """Return backbone features ``[..., N, C]`` as a float32 JAX array after checking their shape and values.

    A JAX array is checked where it lies (one scalar comes back to the host, the features stay on their device);
    anything else goes through numpy.
    """
    a = _checked(x, config)
    return a.astype(jnp.float32) if isinstance(a, jax.Array) else jnp.asarray(a, jnp.float32)


def token_capacity(n: int) -> int:
    """The token count a frame of ``n`` tokens is padded to (4 sizes per octave, at least 16): the jitted head
    compiles once per step of this ladder, not once per image size or aspect ratio."""
    return ivf.capacity(n, minimum=16, steps=TOKEN_STEPS)


@functools.partial(jax.jit, static_argnames=("config", "k"))
def _local_padded(variables, x, n_real, *, config, k):
    feat, attn = RetrievalHead(config).apply(variables, x, method=RetrievalHead.features_and_attention)
    attn = jnp.where(jnp.arange(x.shape[-2]) < n_real, attn, -jnp.inf)  # padding tokens are never kept
    return selection.how_select_local(feat, attn, nfeat=k)


def local_descriptors(variables, config: HeadConfig, feats, *, n_tokens: int | None = None):
    """The head's local descriptors of backbone features ``[..., N, C]``, jitted (MASt3R's ``forward_local``).

    Tokens are padded up to :func:`token_capacity` (padding is never selected), so frames of other sizes reuse
    the compiled program of their step: one compilation per (token step, kept count). Host arrays are padded on
    the host; a JAX array is padded where it lies (a small eager program per token count: pad it before, e.g.
    in torch, and pass ``n_tokens``). Pass variables from :func:`device_variables` (host variables are put on
    the device at every call).

    Args:
        n_tokens: the real token count when ``feats`` is already padded to ``token_capacity(n_tokens)`` tokens
            (zeros or any finite values past them).

    Returns:
        ``(feat [..., k, dim] float32, attn [..., k] float32, idx [..., k] int32)`` JAX arrays, by decreasing
        attention, ``k`` by :func:`resolve_nfeat`.
    """
    a = _checked(feats, config)
    n = int(a.shape[-2])
    if n_tokens is not None:
        if not validate.is_int(n_tokens) or not 1 <= n_tokens <= n or token_capacity(int(n_tokens)) != n:
            raise ValueError(f"n_tokens={n_tokens!r} does not fit features padded to {n} tokens (pad "
                             f"n_tokens real tokens to token_capacity(n_tokens))")
        n = int(n_tokens)
    k = resolve_nfeat(config.nfeat, n)
    lead = tuple(a.shape[:-2])
    if k == 0:
        return _none_kept(lead, config.dim, jnp.float32, jnp.float32)
    pad = [(0, 0)] * (a.ndim - 2) + [(0, token_capacity(n) - a.shape[-2]), (0, 0)]
    if n_tokens is not None:
        x = a.astype(jnp.float32) if isinstance(a, jax.Array) else jnp.asarray(np.asarray(a, np.float32))
    elif isinstance(a, jax.Array):
        x = jnp.pad(a.astype(jnp.float32), pad)
    else:
        x = jnp.asarray(np.pad(np.asarray(a, np.float32), pad))
    whitening = jax.tree_util.tree_leaves(variables.get("whitening", {}))
    if not all(isinstance(w, jax.Array) for w in whitening):
        variables = device_variables(variables)
    return _local_padded(variables, x, np.int32(n), config=config, k=k)


def extract_local(variables, config: HeadConfig, feats):
    """Checked ``forward_local`` on backbone features ``[..., N, C]`` (:func:`local_descriptors`).

    Returns:
        ``(feat [..., k, dim] float32, attn [..., k] float32, idx [..., k] int64)``: ``feat`` and ``attn`` are JAX
        arrays; ``idx`` (token indices of the kept features) is a host numpy array in torch's index dtype, int64.
    """
    feat, attn, idx = local_descriptors(variables, config, feats)
    return feat, attn, np.asarray(idx).astype(np.int64)


def extract_global(variables, config: HeadConfig, feats):
    """Checked ``forward_global`` on backbone features ``[..., N, C]``: ``[..., dim]``."""
    return RetrievalHead(config).apply(variables, check_features(feats, config), method=RetrievalHead.forward_global)


# ---------------------------------------------------------------------------------------------------------
# MASt3R checkpoint import


def args_getter(args):
    if isinstance(args, dict):
        return lambda k, d=None: args.get(k, d)
    return lambda k, d=None: getattr(args, k, d)


def config_from_args(args) -> HeadConfig:
    """A :class:`HeadConfig` from MASt3R's checkpoint ``args`` (an argparse Namespace or a dict).

    ``backbone_dim`` must be among the args (MASt3R takes it from the backbone; :func:`load_mast3r_checkpoint`
    reads it off the weights). ``prewhiten`` / ``postwhiten`` are MASt3R's re-learning frequencies: ``None`` for
    no whitening. As in MASt3R's ``RetrievalModel``, a post-whitening other than ``-1`` needs a projector.
    """
    get = args_getter(args)
    backbone_dim = get("backbone_dim")
    hdims = parse_hdims(get("hdims", "") or "")
    postwhiten = get("postwhiten")
    if postwhiten is not None and postwhiten != -1 and not hdims:
        raise ValueError(f"postwhiten={postwhiten!r} needs a projector (non-empty hdims), as in MASt3R's "
                         "RetrievalModel (only postwhiten=-1 goes without one)")
    return HeadConfig(
        backbone_dim=int(backbone_dim) if backbone_dim is not None else -1,
        hdims=hdims,
        residual=bool(get("residual", False)),
        prewhiten=get("prewhiten") is not None,
        postwhiten=postwhiten is not None,
        featweights=get("featweights", "l2norm") or "l2norm",
        nfeat=get("nfeat", 300) if get("nfeat") is not None else 300,
    )


def _to_numpy(v):
    return np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)


def infer_backbone_dim(state: dict, args) -> int | None:
    """The backbone's channel count read off the weights a MASt3R checkpoint holds, or None if none tells.

    MASt3R takes it from the backbone (``enc_embed_dim``); the head's weights that touch the backbone features
    carry it too: ``prewhiten.m [1, C]``, the first projector layer ``projector.0.weight [h0, C]``, and, when
    there is no projector (``hdims == ''``, so the output dim is ``C``), ``postwhiten.m [1, C]``.
    """
    keys = ["prewhiten.m", "projector.0.weight"]
    if not parse_hdims(args_getter(args)("hdims", "") or ""):
        keys.append("postwhiten.m")
    for key in keys:
        if key in state:
            shape = tuple(_to_numpy(state[key]).shape)
            if len(shape) != 2:
                raise ValueError(f"checkpoint '{key}' has shape {shape}, expected a matrix")
            return int(shape[-1])
    return None


def variables_from_state_dict(state: dict, config: HeadConfig) -> dict:
    """Flax variables from a MASt3R ``RetrievalModel`` state dict (torch tensors or arrays; backbone keys ignored).

    Projector ``nn.Sequential`` indices map as Linear ``3j`` -> ``linear_j`` (weight transposed), LayerNorm
    ``3j + 1`` -> ``norm_j``. The leaves are host numpy arrays (float32; the whitening float64, as MASt3R keeps
    it): building them touches no device (:func:`device_variables` moves them).
    """
    arr = {k: _to_numpy(v) for k, v in state.items() if not k.startswith("backbone.")}
    params, whitening, used = {}, {}, set()

    def take(key, shape):
        if key not in arr:
            raise ValueError(f"checkpoint lacks '{key}'")
        if tuple(arr[key].shape) != tuple(shape):
            raise ValueError(f"checkpoint '{key}' has shape {tuple(arr[key].shape)}, expected {tuple(shape)}")
        used.add(key)
        return arr[key]

    for name, on, dim in (("prewhiten", config.prewhiten, config.backbone_dim),
                          ("postwhiten", config.postwhiten, config.dim)):
        if on:
            whitening[name] = {"m": take(f"{name}.m", (1, dim)).astype(np.float64),
                               "p": take(f"{name}.p", (dim, dim)).astype(np.float64)}
    d = config.backbone_dim
    for j, h in enumerate(config.hdims):
        w = take(f"projector.{3 * j}.weight", (h, d))
        b = take(f"projector.{3 * j}.bias", (h,))
        params[f"linear_{j}"] = {"kernel": np.ascontiguousarray(w.T, np.float32), "bias": b.astype(np.float32)}
        if j < len(config.hdims) - 1:
            params[f"norm_{j}"] = {"scale": take(f"projector.{3 * j + 1}.weight", (h,)).astype(np.float32),
                                   "bias": take(f"projector.{3 * j + 1}.bias", (h,)).astype(np.float32)}
        d = h
    unexpected = sorted(set(arr) - used)
    if unexpected:
        raise ValueError(f"checkpoint has keys the head does not use: {unexpected[:5]}")
    variables = {"params": params}
    if whitening:
        variables["whitening"] = whitening
    return variables


def read_mast3r_checkpoint(path) -> tuple:
    """``(args, state)`` of a MASt3R retrieval checkpoint, read with ``torch.load(weights_only=True)``."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading MASt3R checkpoints needs torch: pip install 'jasmk[torch]'") from exc
    safe_globals = getattr(getattr(torch, "serialization", None), "safe_globals", None)
    if safe_globals is None:
        raise ValueError(f"torch {torch.__version__} cannot load checkpoints without running their code "
                         "(torch.serialization.safe_globals is missing): install torch >= 2.5 to read "
                         f"{path}")
    try:
        # weights only: tensors, containers and MASt3R's argparse.Namespace of arguments; nothing else runs
        with safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # OSError, EOFError, RuntimeError, pickle.UnpicklingError (refused globals)...
        raise ValueError(f"cannot read checkpoint {path} as weights only: {exc}") from exc
    if not isinstance(ckpt, dict) or "args" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a MASt3R retrieval checkpoint (needs 'args' and 'model')")
    if not isinstance(ckpt["model"], dict):
        raise ValueError(f"{path}: 'model' must be a state dict, got {type(ckpt['model']).__name__}")
    return ckpt["args"], ckpt["model"]


def load_mast3r_checkpoint(path, *, backbone_dim: int | None = None):
    """Read a MASt3R retrieval checkpoint (torch ``.pth`` with ``args`` and ``model``) into the Flax head.

    Args:
        path: the ``.pth`` file.
        backbone_dim: the backbone's channel count ``C`` (MASt3R's ``backbone.enc_embed_dim``). Needed only when
            the checkpoint's weights do not tell it (no pre-whitening, no projector, no post-whitening: the head
            is the identity); when they do, it must agree.

    Returns:
        ``(config, variables, info)`` with ``info = {"imsize": ..., "nclusters": ...}`` from the args; the
        variables are host arrays (see :func:`variables_from_state_dict`).
    """
    args, state = read_mast3r_checkpoint(path)
    return head_from_mast3r(args, state, backbone_dim=backbone_dim, source=path)


def head_from_mast3r(args, state: dict, *, backbone_dim: int | None = None, source="the checkpoint"):
    """:func:`load_mast3r_checkpoint` on a checkpoint already read (:func:`read_mast3r_checkpoint`)."""
    get = args_getter(args)
    found = get("backbone_dim")
    if found is None:
        found = infer_backbone_dim(state, args)
    if backbone_dim is not None:
        if not validate.is_int(backbone_dim) or backbone_dim < 1:
            raise ValueError(f"backbone_dim must be a positive int, got {backbone_dim!r}")
        if found is not None and int(found) != int(backbone_dim):
            raise ValueError(f"backbone_dim={backbone_dim} but {source} is for {found}-channel backbone features")
        found = backbone_dim
    if found is None:
        raise ValueError(f"cannot tell the backbone dimension from {source}: it holds no pre-whitening, "
                         "projector or post-whitening weights; pass backbone_dim= (MASt3R reads it from its "
                         "backbone's enc_embed_dim)")
    cfg_args = {k: get(k) for k in ("hdims", "residual", "prewhiten", "postwhiten", "featweights", "nfeat")}
    cfg_args["backbone_dim"] = int(found)
    config = config_from_args(cfg_args)
    variables = variables_from_state_dict(state, config)
    info = {"imsize": get("imsize"), "nclusters": get("nclusters")}
    log.info("loaded MASt3R retrieval head from %s: %s", source, config)
    return config, variables, info


def mast3r_codebook_path(checkpoint_path) -> str:
    """The ASMK codebook pickle MASt3R's ``Retriever`` loads for a retrieval checkpoint.

    MASt3R's rule: in the checkpoint's folder, the file name's ``_``-separated parts but the last, joined by ``_``,
    then ``_codebook.pkl`` (``MASt3R_..._retrieval_trainingfree.pth`` -> ``MASt3R_..._retrieval_codebook.pkl``;
    a name without ``_`` gives ``_codebook.pkl``).

    Raises:
        ValueError: the codebook file is not there.
    """
    folder, name = os.path.split(os.fspath(checkpoint_path))
    found = os.path.join(folder, "_".join(name.split("_")[:-1]) + "_codebook.pkl")
    if not os.path.isfile(found):
        raise ValueError(f"no codebook for the retrieval checkpoint {checkpoint_path}: MASt3R expects it at "
                         f"{found} (the checkpoint name up to its last '_', then '_codebook.pkl')")
    return found


# ---------------------------------------------------------------------------------------------------------
# Orbax checkpoints


def save_head(path, config: HeadConfig, variables) -> str:
    """Save head variables and config as an atomic Orbax checkpoint (the whitening as float64)."""
    tree = dict(variables)
    if "whitening" in tree:
        tree["whitening"] = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree["whitening"])
    return checkpoint.save_tree(path, tree, meta={"kind": "head", "config": dataclasses.asdict(config)})


def load_head(path):
    """Load ``(config, variables)`` saved with :func:`save_head`; the variables are on the default device
    (:func:`device_variables`), the whitening float64.

    A head saved by an earlier jasmk may hold a float32 whitening (it was cast when ``jax_enable_x64`` was
    off): it loads, widened to float64, and if it is ill-conditioned (condition number above
    :data:`ILL_CONDITIONED`, as MASt3R's whitening of LayerNorm'd tokens is) one
    :class:`WhiteningPrecisionWarning` says to import the MASt3R ``.pth`` again.
    """
    tree, meta = checkpoint.load_tree(path)
    if meta.get("kind") != "head":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a retrieval head")
    config = HeadConfig(**meta["config"])
    lossy = []
    for name, stats in sorted((tree.get("whitening") or {}).items()):
        p = np.asarray(stats["p"])
        if p.dtype != np.float64:
            cond = np.linalg.cond(p.astype(np.float64))
            if not cond <= ILL_CONDITIONED:
                lossy.append(f"{name} ({p.dtype}, condition number {cond:.1e})")
    if lossy:
        warnings.warn(f"{path}: the head's whitening was saved in reduced precision and is ill-conditioned: "
                      f"{', '.join(lossy)}; its features will differ from MASt3R's. Import the MASt3R .pth again "
                      "(jasmk.head.load_mast3r_checkpoint) and save the head anew: jasmk now keeps whitening in "
                      "float64", WhiteningPrecisionWarning, stacklevel=2)
    return config, device_variables(tree)

__all__ = ["HeadConfig", "ILL_CONDITIONED", "RetrievalHead", "TOKEN_STEPS", "Whitener",
           "WhiteningPrecisionWarning", "args_getter", "check_features", "config_from_args", "device_variables",
           "extract_global", "extract_local", "head_from_mast3r", "infer_backbone_dim", "init_head", "load_head",
           "load_mast3r_checkpoint", "local_descriptors", "mast3r_codebook_path", "parse_hdims",
           "read_mast3r_checkpoint", "resolve_nfeat", "save_head", "token_capacity", "variables_from_state_dict"]
