"""Time per frame of the retrieval head at MASt3R's sizes, against MASt3R's head formulas in torch.

One frame is one 512x384 image: 768 backbone tokens of 1024 channels (ViT-Large, 16-pixel patches). Two heads:
``trainingfree`` (no projector; the post-whitening, 1024 x 1024, on the tokens) and ``projector`` (pre-whitening,
a 1024_1024 projector, post-whitening). Each keeps MASt3R's 300 local features. jasmk runs its jitted
``forward_local`` with the variables on the device (whitening float64, the rest float32); the peer is MASt3R's
``RetrievalModel`` head written out in torch (float64 ``Whitener``, float32 ``Linear`` / ``LayerNorm`` / ``GELU``,
``topk``), on the same device kind (CPU, or CUDA with ``--device cuda``), one frame per call as MASt3R's
``extract_local_features`` does. Prints the median of ``--repeat`` timed calls after warm-up, and jasmk / torch.

    python experiments/bench_head.py [--repeat 20] [--batch 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jasmk import head  # noqa: E402

C, TOKENS, NFEAT = 1024, 768, 300
HEADS = {"trainingfree": dict(prewhiten=False, hdims=(), postwhiten=True),
         "projector": dict(prewhiten=True, hdims=(1024, 1024), postwhiten=True)}


def state_dict(spec, rng):
    """MASt3R-format weights: float64 whitening (a random rotation scaled up to 1e7, as conditioned as MASt3R's),
    float32 projector."""
    state = {}
    dim = spec["hdims"][-1] if spec["hdims"] else C
    for name, on, d in (("prewhiten", spec["prewhiten"], C), ("postwhiten", spec["postwhiten"], dim)):
        if on:
            q, _ = np.linalg.qr(rng.standard_normal((d, d)))
            state[f"{name}.m"] = rng.standard_normal((1, d))
            state[f"{name}.p"] = q * np.logspace(0, 7, d)[None, :] / np.sqrt(d)
    d = C
    for j, h in enumerate(spec["hdims"]):
        state[f"projector.{3 * j}.weight"] = (rng.standard_normal((h, d)) / np.sqrt(d)).astype(np.float32)
        state[f"projector.{3 * j}.bias"] = np.zeros(h, np.float32)
        if j < len(spec["hdims"]) - 1:
            state[f"projector.{3 * j + 1}.weight"] = np.ones(h, np.float32)
            state[f"projector.{3 * j + 1}.bias"] = np.zeros(h, np.float32)
        d = h
    return state


def median_time(fn, repeat):
    fn()
    fn()  # warm-up: compilation, caches
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def jasmk_head(spec, state, x):
    config = head.HeadConfig(backbone_dim=C, nfeat=NFEAT, **spec)
    variables = head.variables_from_state_dict(state, config)
    put = getattr(head, "device_variables", jax.device_put)  # an older jasmk had no device_variables
    variables = put(variables)
    model = head.RetrievalHead(config)
    fwd = jax.jit(lambda v, a: model.apply(v, a, method=head.RetrievalHead.forward_local))
    xj = jax.device_put(jnp.asarray(x))
    return lambda: jax.block_until_ready(fwd(variables, xj))


def torch_head(spec, state, x, device):
    import torch

    t = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in state.items()}
    layers, d = [], C
    for j, h in enumerate(spec["hdims"]):
        lin = torch.nn.Linear(d, h)
        lin.weight.data, lin.bias.data = t[f"projector.{3 * j}.weight"], t[f"projector.{3 * j}.bias"]
        layers.append(lin)
        if j < len(spec["hdims"]) - 1:
            norm = torch.nn.LayerNorm(h)
            norm.weight.data, norm.bias.data = t[f"projector.{3 * j + 1}.weight"], t[f"projector.{3 * j + 1}.bias"]
            layers += [norm, torch.nn.GELU()]
        d = h
    projector = torch.nn.Sequential(*layers).to(device)

    def whiten(v, name):
        if f"{name}.m" not in t:
            return v
        flat = v.reshape(-1, v.shape[-1]).double()
        return torch.matmul(flat - t[f"{name}.m"], t[f"{name}.p"]).reshape(v.shape).to(v.dtype)

    xt = torch.from_numpy(x).to(device)

    @torch.no_grad()
    def run():
        pre = whiten(xt, "prewhiten")
        proj = projector(pre)
        attn = proj.norm(dim=-1)
        feat = whiten(proj, "postwhiten")
        _, idx = torch.topk(attn, NFEAT, dim=1)
        out = torch.gather(feat, 1, idx[..., None].expand(-1, -1, feat.shape[2]))
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="frames per call (MASt3R: 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch's device for the peer")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, TOKENS, C)).astype(np.float32)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.batch} frame(s) of {TOKENS} x {C} tokens, "
          f"median of {args.repeat}")
    print(f"{'head':<14}{'jasmk ms/frame':>16}{'torch ms/frame':>16}{'jasmk/torch':>13}")
    for name, spec in HEADS.items():
        state = state_dict(spec, rng)
        ours = median_time(jasmk_head(spec, state, x), args.repeat) / args.batch
        peer = median_time(torch_head(spec, state, x, args.device), args.repeat) / args.batch
        print(f"{name:<14}{ours * 1e3:>16.2f}{peer * 1e3:>16.2f}{ours / peer:>13.2f}")


if __name__ == "__main__":
    main()
