"""Parameter presets per kind of local feature: ``preset="how"`` (jasmk's defaults), ``"mast3r"`` and ``"sift"``.

Each value says where it comes from. HOW's and MASt3R's are their published ASMK parameters; SIFT's were chosen
on a validation split of real photos (``experiments/tune_sift.py`` on ``experiments/bench_real.py``'s data,
docs/real_photos.md), never on its test images.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "Preset", "get", "resolve", "rootsift", "sift_input"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """ASMK parameters for one kind of local feature.

    Attributes:
        binary: ASMK* (packed sign bits) or ASMK (real vectors).
        use_idf: idf word weights.
        index_multiple_assignment, query_multiple_assignment: words per database / query descriptor.
        alpha, similarity_threshold: the selective match kernel's exponent and threshold.
        words: the vocabulary size it was chosen with (None: the model's own codebook).
        rootsift: ``"auto"``: raw SIFT (not unit-norm) is turned into RootSIFT, unit-norm descriptors (hloc's, which
            are RootSIFT already) are left as they are; False: descriptors are used as given.
        source: where the values come from.
    """

    binary: bool
    use_idf: bool
    index_multiple_assignment: int
    query_multiple_assignment: int
    alpha: float
    similarity_threshold: float
    words: int | None
    rootsift: object
    source: str

    def build_kwargs(self) -> dict:
        return {"binary": self.binary, "use_idf": self.use_idf, "multiple_assignment": self.index_multiple_assignment}

    def query_kwargs(self) -> dict:
        return {"multiple_assignment": self.query_multiple_assignment, "alpha": self.alpha,
                "similarity_threshold": self.similarity_threshold}


_HOW = ("HOW (Tolias et al., ECCV 2020) with asmk 0.1.1's parameter files eccv20_how_*.yml: ASMK*, no idf, "
        "MA 1 / 5, alpha 3, tau 0, 65,536 words")

PRESETS = {
    "how": Preset(binary=True, use_idf=False, index_multiple_assignment=1, query_multiple_assignment=5, alpha=3.0,
                  similarity_threshold=0.0, words=65536, rootsift=False, source=_HOW),
    "mast3r": Preset(binary=True, use_idf=False, index_multiple_assignment=1, query_multiple_assignment=5,
                     alpha=3.0, similarity_threshold=0.0, words=None, rootsift=False,
                     source="MASt3R's retrieval (mast3r/retrieval): its ASMK parameters (jasmk.mast3r.ASMK_PARAMS) "
                            "and the codebook shipped with its checkpoint"),
    "sift": Preset(binary=True, use_idf=False, index_multiple_assignment=2, query_multiple_assignment=3, alpha=3.0,
                   similarity_threshold=0.0, words=4096, rootsift="auto",
                   source="experiments/tune_sift.py (2026-12-06): the best ASMK* setting of a 64-setting grid at 1k "
                          "and 4k words on the validation scenes of experiments/bench_real.py (val mAP 98.6 against "
                          "97.7 for HOW's MA 1 / 5; ASMK with idf, MA 2 / 3 reached 98.9 at 32x the posting "
                          "memory); RootSIFT as Arandjelovic & Zisserman (CVPR 2012)"),
}


def get(preset) -> Preset:
    """The :class:`Preset` named ``preset`` (or ``preset`` itself).

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(map(repr, sorted(PRESETS)))}")
    return PRESETS[preset]


def rootsift(x) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman): each row L1-normalized, then square-rooted (unit L2 norm).
    ``[N, D]`` non-negative -> ``[N, D] float32``."""
    x = np.asarray(x, np.float64)
    if x.size and x.min() < 0:
        raise ValueError("RootSIFT needs non-negative descriptors (SIFT's histograms); these have negative values")
    x = x / np.maximum(x.sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(x).astype(np.float32)


def sift_input(x, *, mode="auto") -> np.ndarray:
    """SIFT descriptors as ``preset="sift"`` uses them: ``mode="auto"`` turns raw SIFT (rows not of unit L2
    norm: OpenCV's and COLMAP's 0-255 values) into RootSIFT and leaves unit-norm rows (hloc's SIFT, RootSIFT
    already) as they are, so RootSIFT is never applied twice; True always applies it; False never."""
    x = np.asarray(x)
    if mode is False or not x.size:
        return x
    if mode == "auto":
        norms = np.linalg.norm(np.asarray(x[:1024], np.float64), axis=1)
        if np.allclose(norms, 1.0, atol=1e-2):
            log.info("SIFT descriptors are unit-norm (RootSIFT already, as hloc's): used as they are")
            return x
        log.info("SIFT descriptors are raw (norms %.3g..%.3g): turned into RootSIFT", norms.min(), norms.max())
    return rootsift(x)


def resolve(preset, given: dict, defaults: dict, values: dict) -> dict:
    """``given`` with ``preset``'s ``values`` in place of the arguments left at their ``defaults`` (an argument
    passed with another value than its default wins over the preset); ``given`` unchanged without a preset."""
    if preset is None:
        return dict(given)
    out = dict(given)
    for key, value in values.items():
        if given[key] == defaults[key]:
            out[key] = value
    return out
