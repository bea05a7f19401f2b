"""The MASt3R/HOW retrieval head in Flax: prewhiten -> projector MLP -> attention -> postwhiten.

The head maps backbone features ``[..., N, C]`` to local descriptors for ASMK (``forward_local``: the ``nfeat``
features of largest attention) or to a global descriptor (``forward_global``: weighted SPoC). Attention is the
L2 norm of the projected features, taken before post-whitening. Whitening statistics live in the
``"whitening"`` variable collection, apart from the trainable ``"params"``, so optimizers never touch them.

``load_mast3r_checkpoint`` converts a MASt3R retrieval checkpoint (torch ``.pth``) into a config and Flax
variables; torch is needed only for that (``pip install jasmk[torch]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import select, whiten

log = logging.getLogger(__name__)


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
        postwhiten: whiten projected features last (needs a projector).
        featweights: attention kind; only ``"l2norm"``.
        nfeat: local features kept by ``forward_local`` (count, or fraction in [-1, 0)).
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
        if self.postwhiten and not self.hdims:
            raise ValueError("postwhiten needs a projector (non-empty hdims)")
        select.resolve_nfeat(self.nfeat, 1 << 30)  # validates the value

    @property
    def dim(self) -> int:
        """Output descriptor dimension."""
        return self.hdims[-1] if self.hdims else self.backbone_dim


class Whitener(nn.Module):
    """``(x - m) @ p`` with ``m [1, dim]`` and ``p [dim, dim]`` in the ``"whitening"`` collection (identity at init)."""

    dim: int

    @nn.compact
    def __call__(self, x):
        m = self.variable("whitening", "m", lambda: jnp.zeros((1, self.dim), jnp.float64 if jax.config.jax_enable_x64
                                                                    else jnp.float32))
        p = self.variable("whitening", "p", lambda: jnp.eye(self.dim, dtype=m.value.dtype))
        return whiten.whiten(x, m.value, p.value)


class RetrievalHead(nn.Module):
    """The retrieval head; ``__call__`` is ``forward_global``."""

    config: HeadConfig

    def setup(self):
        cfg = self.config
        self.prewhiten = Whitener(cfg.backbone_dim) if cfg.prewhiten else None
        self.postwhiten = Whitener(cfg.dim) if cfg.postwhiten else None
        self.linears = [nn.Dense(h, name=f"linear_{i}") for i, h in enumerate(cfg.hdims)]
        self.norms = [nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=f"norm_{i}") for i in range(len(cfg.hdims) - 1)]

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
        """``(features [..., N, dim], attention [..., N])``: attention from the projected features, then post-whitening."""
        _, h = self.project(x)
        attn = select.attention_l2(h)
        feat = self.postwhiten(h) if self.postwhiten is not None else h
        return feat, attn

    def forward_local(self, x):
        """The ``nfeat`` local features of largest attention: ``(feat [..., k, dim], attn [..., k], idx [..., k])``."""
        feat, attn = self.features_and_attention(x)
        return select.how_select_local(feat, attn, nfeat=self.config.nfeat)

    def forward_global(self, x):
        """Weighted SPoC global descriptor ``[..., dim]``."""
        feat, attn = self.features_and_attention(x)
        return select.weighted_spoc(feat, attn)

    def __call__(self, x):
        return self.forward_global(x)


def init_head(config: HeadConfig, *, seed: int = 0):
    """Fresh variables ``{"params": ..., "whitening": ...}`` for ``config`` (whitening = identity)."""
    model = RetrievalHead(config)
    return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1, config.backbone_dim), jnp.float32))


def check_features(x, config: HeadConfig):
    """Return backbone features as a float32 array after checking their shape and values (host-side)."""
    a = np.asarray(x)
    if a.ndim < 2 or a.shape[-1] != config.backbone_dim:
        raise ValueError(f"backbone features must be [..., N, {config.backbone_dim}], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("backbone features contain NaN or inf values")
    return jnp.asarray(a, jnp.float32)


def extract_local(variables, config: HeadConfig, feats):
    """Checked ``forward_local`` on backbone features ``[..., N, C]``."""
    return RetrievalHead(config).apply(variables, check_features(feats, config), method=RetrievalHead.forward_local)


def extract_global(variables, config: HeadConfig, feats):
    """Checked ``forward_global`` on backbone features ``[..., N, C]``: ``[..., dim]``."""
    return RetrievalHead(config).apply(variables, check_features(feats, config), method=RetrievalHead.forward_global)


# ---------------------------------------------------------------------------------------------------------
# MASt3R checkpoint import


def config_from_args(args) -> HeadConfig:
    """A :class:`HeadConfig` from MASt3R's checkpoint ``args`` (an argparse Namespace or a dict)."""
    get = (lambda k, d=None: args.get(k, d)) if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
    backbone_dim = get("backbone_dim")
    return HeadConfig(
        backbone_dim=int(backbone_dim) if backbone_dim is not None else -1,
        hdims=parse_hdims(get("hdims", "")),
        residual=bool(get("residual", False)),
        prewhiten=get("prewhiten") is not None,
        postwhiten=get("postwhiten") is not None,
        featweights=get("featweights", "l2norm"),
        nfeat=get("nfeat", 300),
    )


def variables_from_state_dict(state: dict, config: HeadConfig) -> dict:
    """Flax variables from a MASt3R ``RetrievalModel`` state dict (torch tensors or arrays; backbone keys ignored).

    Projector ``nn.Sequential`` indices map as Linear ``3j`` -> ``linear_j`` (weight transposed), LayerNorm
    ``3j + 1`` -> ``norm_j``.
    """
    arr = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in state.items()
           if not k.startswith("backbone.")}
    params, whitening, used = {}, {}, set()

    def take(key, shape):
        if key not in arr:
            raise ValueError(f"checkpoint lacks '{key}'")
        if tuple(arr[key].shape) != tuple(shape):
            raise ValueError(f"checkpoint '{key}' has shape {tuple(arr[key].shape)}, expected {tuple(shape)}")
        used.add(key)
        return arr[key]

    wdtype = np.float64 if jax.config.jax_enable_x64 else np.float32
    for name, on, dim in (("prewhiten", config.prewhiten, config.backbone_dim),
                          ("postwhiten", config.postwhiten, config.dim)):
        if on:
            whitening[name] = {"m": jnp.asarray(take(f"{name}.m", (1, dim)).astype(wdtype)),
                               "p": jnp.asarray(take(f"{name}.p", (dim, dim)).astype(wdtype))}
    d = config.backbone_dim
    for j, h in enumerate(config.hdims):
        w = take(f"projector.{3 * j}.weight", (h, d))
        b = take(f"projector.{3 * j}.bias", (h,))
        params[f"linear_{j}"] = {"kernel": jnp.asarray(w.T.astype(np.float32)), "bias": jnp.asarray(b.astype(np.float32))}
        if j < len(config.hdims) - 1:
            params[f"norm_{j}"] = {"scale": jnp.asarray(take(f"projector.{3 * j + 1}.weight", (h,)).astype(np.float32)),
                                   "bias": jnp.asarray(take(f"projector.{3 * j + 1}.bias", (h,)).astype(np.float32))}
        d = h
    unexpected = sorted(set(arr) - used)
    if unexpected:
        raise ValueError(f"checkpoint has keys the head does not use: {unexpected[:5]}")
    variables = {"params": params}
    if whitening:
        variables["whitening"] = whitening
    return variables


def load_mast3r_checkpoint(path):
    """Read a MASt3R retrieval checkpoint (torch ``.pth`` with ``args`` and ``model``) into the Flax head.

    Returns:
        ``(config, variables, info)`` with ``info = {"imsize": ..., "nclusters": ...}`` from the args.
    """
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
    args, state = ckpt["args"], ckpt["model"]
    get = (lambda k, d=None: args.get(k, d)) if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
    backbone_dim = get("backbone_dim")
    if backbone_dim is None:  # the checkpoint keeps no backbone: read the dim off the first layer it has
        for key in ("prewhiten.m", "projector.0.weight"):
            if key in state:
                backbone_dim = state[key].shape[-1]
                break
    if backbone_dim is None:
        raise ValueError("cannot tell the backbone dimension from the checkpoint")
    cfg_args = {k: get(k) for k in ("hdims", "residual", "prewhiten", "postwhiten", "featweights", "nfeat")}
    cfg_args["backbone_dim"] = int(backbone_dim)
    cfg_args["hdims"] = cfg_args["hdims"] if cfg_args["hdims"] is not None else ""
    cfg_args["featweights"] = cfg_args["featweights"] or "l2norm"
    cfg_args["nfeat"] = cfg_args["nfeat"] if cfg_args["nfeat"] is not None else 300
    config = config_from_args(cfg_args)
    variables = variables_from_state_dict(state, config)
    info = {"imsize": get("imsize"), "nclusters": get("nclusters")}
    log.info("loaded MASt3R retrieval head from %s: %s", path, config)
    return config, variables, info


# ---------------------------------------------------------------------------------------------------------
# Orbax checkpoints


def save_head(path, config: HeadConfig, variables) -> str:
    """Save head variables and config as an atomic Orbax checkpoint."""
    from . import checkpoint

    return checkpoint.save_tree(path, variables, meta={"kind": "head", "config": dataclasses.asdict(config)})


def load_head(path):
    """Load ``(config, variables)`` saved with :func:`save_head`."""
    from . import checkpoint

    tree, meta = checkpoint.load_tree(path)
    if meta.get("kind") != "head":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a retrieval head")
    config = HeadConfig(**meta["config"])
    variables = jax.tree_util.tree_map(jnp.asarray, tree)
    return config, variables
