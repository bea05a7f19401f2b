"""Pictures of retrieval results: a grid of queries with their top-k results, and a heat map of a score matrix.

Both functions write a PNG and return its path. matplotlib (and Pillow, which it depends on) is imported only
when a picture is made, through its object-oriented API and the Agg canvas: the global pyplot backend of the
caller (a notebook, say) is left alone, and ``import jasmk`` never imports matplotlib.

Results grid layout (all sizes in pixels, the keyword options of :func:`results_grid`)::

    cell   = tile + 2 * frame                         one image inside its coloured frame
    x(c)   = gap + c * (cell + gap) + (query_gap if c > 0 else 0)      column c = 0 (query), 1..k (results)
    y(r)   = gap + r * (caption + cell + gap) + caption                row r (query r); captions sit above
    width  = gap + (k + 1) * cell + k * gap + query_gap + gap
    height = gap + n_rows * (caption + cell + gap)

The frame of a result is the ring of width ``frame`` inside ``[y, y + cell) x [x, x + cell)``; its colour says
whether the result is right under the revisited Oxford/Paris protocol (:mod:`jasmk.eval`): :data:`COLORS`
``correct`` (a positive), ``wrong`` (not a positive and not ignored) or ``junk`` (ignored by the protocol).
Without ground truth results get no frame (background colour). Queries are framed in ``query`` blue. Images
keep their aspect ratio, centred in the tile.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os

import numpy as np

from . import evaluation as jeval
from .core import validate
from .storage import atomic, paths

log = logging.getLogger(__name__)

# RGB uint8 frame colours.
COLORS = {
    "correct": (0, 170, 0),
    "wrong": (220, 20, 20),
    "junk": (240, 190, 0),
    "query": (30, 90, 220),
}
BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (235, 235, 235)



# ---------------------------------------------------------------------------------------------------------
# checks and writing


def check_out_path(out) -> str:
    """The PNG path ``out``, after checking that writing it destroys nothing jasmk did not write
    (:func:`jasmk.storage.paths.check_file_target`)."""
    if isinstance(out, (str, os.PathLike)) and os.fspath(out) and not os.fspath(out).lower().endswith(".png"):
        raise ValueError(f"out must end in .png (the picture is a PNG), got {out!r}")
    return paths.check_file_target(out, magic=paths.PNG_MAGIC, what="PNG picture")


def _save_png(fig, out: str, *, dpi) -> str:
    """``fig`` written to ``out`` atomically: a temporary file in the same folder, then ``os.replace``."""
    atomic.write_bytes_with(out, lambda handle: fig.savefig(handle, format="png", dpi=dpi), suffix=".png")
    log.debug("picture saved to %s", out)
    return out


def _check_int(value, name, minimum):
    if not validate.is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_dpi(dpi):
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float, np.integer, np.floating)) or not (
            math.isfinite(dpi) and dpi > 0):
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    return float(dpi)


def _figure(width_px, height_px, dpi):
    """A matplotlib Figure on an Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------------------------------------------------
# images


def load_image(src, *, where: str = "image") -> np.ndarray:
    """``[H, W, 3] uint8`` RGB from an image path (PNG, JPEG, ... optionally ``.gz`` compressed) or an array.

    Arrays may be ``[H, W]`` (gray), ``[H, W, 3]`` or ``[H, W, 4]`` (alpha dropped); uint8 is used as is,
    bool as 0 / 255, floats in ``[0, 1]`` are scaled by 255 and other numbers are stretched to ``[0, 255]``.
    """
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise ValueError(f"{where}: no such image file: {path!r}")
        from PIL import Image

        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as handle:
                data = handle.read()
            with Image.open(io.BytesIO(data)) as img:
                return np.asarray(img.convert("RGB"))
        except Exception as exc:  # PIL.UnidentifiedImageError, OSError, EOFError, ...
            raise ValueError(f"{where}: cannot read the image {path!r}: {exc}") from None
    a = np.asarray(src)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        a = a[..., :3]
    elif a.ndim != 2:
        raise ValueError(f"{where}: an image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{where}: the image is empty (shape {a.shape})")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{where}: an image array must be numeric, got dtype {a.dtype}")
    elif a.dtype != np.uint8:
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise ValueError(f"{where}: the image holds NaN or inf")
        if np.issubdtype(a.dtype, np.floating) and f.min() >= 0 and f.max() <= 1:
            f = f * 255
        elif f.min() < 0 or f.max() > 255:
            f = 255 * (f - f.min()) / max(float(np.ptp(f)), 1e-12)
        a = np.rint(f).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a)


def _fit(img: np.ndarray, tile: int) -> np.ndarray:
    """``img`` scaled (aspect kept) and centred on a ``[tile, tile, 3]`` background."""
    from PIL import Image

    h, w = img.shape[:2]
    scale = tile / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))
    out = np.empty((tile, tile, 3), np.uint8)
    out[:] = TILE_BACKGROUND
    y, x = (tile - nh) // 2, (tile - nw) // 2
    out[y:y + nh, x:x + nw] = small
    return out


# ---------------------------------------------------------------------------------------------------------
# results grid


def result_marks(ranks, gnd, *, n_db: int, protocol: str = "medium") -> np.ndarray:
    """``[n_query, k]`` marks of ranked results: ``"correct"``, ``"wrong"``, ``"junk"``, or ``""`` for padding
    (a negative rank, as :func:`jasmk.query_padded` returns for empty slots).

    ``gnd`` holds one revisited-format dict (``easy``, ``hard``, optional ``junk``) per query row; under
    ``protocol`` (``"easy"``, ``"medium"`` or ``"hard"``, see :data:`jasmk.eval.PROTOCOLS`) its positives are
    correct and its ignored images junk.
    """
    if protocol not in jeval.PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(jeval.PROTOCOLS)}, got {protocol!r}")
    r = _check_ranks(ranks, n_db)
    if not isinstance(gnd, (list, tuple)) or len(gnd) != r.shape[0]:
        raise ValueError(f"gnd must be a list of {r.shape[0]} dicts (one per query row), got "
                         f"{type(gnd).__name__}{f' of length {len(gnd)}' if hasattr(gnd, '__len__') else ''}")
    pos_keys, ign_keys = jeval.PROTOCOLS[protocol]
    pos, ign = jeval.masks_from_gnd(list(gnd), n_db, positives=pos_keys, ignore=ign_keys)
    safe = np.maximum(r, 0)
    rows = np.arange(r.shape[0])[:, None]
    marks = np.where(pos[rows, safe], "correct", np.where(ign[rows, safe], "junk", "wrong")).astype(object)
    marks[r < 0] = ""
    return marks


def _check_ranks(ranks, n_db: int) -> np.ndarray:
    r = np.asarray(ranks)
    if r.ndim != 2:
        raise ValueError(f"ranks must be [n_query, k] database ids, got shape {r.shape}")
    if r.size and not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database ids, got dtype {r.dtype}")
    r = r.astype(np.int64)
    if r.size and r.max() >= n_db:
        raise ValueError(f"ranks hold database id {int(r.max())} but only {n_db} database images are given")
    return r


def _names(names, n, what):
    if names is None:
        return None
    names = [str(x) for x in names]
    if len(names) != n:
        raise ValueError(f"{what} must list {n} names, got {len(names)}")
    return names


def _short(text: str, n_chars: int) -> str:
    return text if len(text) <= n_chars else "\u2026" + text[-max(1, n_chars - 1):]


def results_grid(queries, database, ranks, out, *, gnd=None, protocol: str = "medium", scores=None, topk: int = 5,
                 rows=None, query_names=None, db_names=None, tile: int = 128, frame: int = 6, gap: int = 6,
                 query_gap: int = 18, caption: int = 16, dpi: float = 100, title: str | None = None) -> str:
    """Write a PNG of queries (left column) with their top-``topk`` results to the right.

    Args:
        queries: one image per row of ``ranks`` (paths or arrays, see :func:`load_image`).
        database: the database images, indexed by the ids in ``ranks``.
        ranks: ``[n_query, k] int`` database ids per query, best first (``jasmk.query(...).ranks``;
            negative ids are empty slots).
        out: the ``.png`` path (written atomically; an existing file is replaced only if it is a PNG).
        gnd: optional ground truth, one revisited-format dict per query row (:mod:`jasmk.eval`); frames are
            then coloured by :func:`result_marks` under ``protocol``. None: results are not marked.
        scores: optional ``[n_query, k]`` scores printed above the results.
        topk: results shown per query (at most ``k``).
        rows: optional query rows to show (default: all), in this order.
        query_names, db_names: optional captions (one per query row / database image).
        tile, frame, gap, query_gap, caption: the pixel layout (module docstring).
        dpi: only sets the caption font size in points; the picture is exactly the pixel size of the layout.
        title: optional text in the top gap (``gap`` is raised to fit it).

    Returns:
        ``out``.
    """
    out = check_out_path(out)
    if not isinstance(database, (list, tuple)) or not database:
        raise ValueError("database must be a non-empty list of image paths or arrays")
    if not isinstance(queries, (list, tuple)) or not queries:
        raise ValueError("queries must be a non-empty list of image paths or arrays")
    n_db = len(database)
    r = _check_ranks(ranks, n_db)
    if r.shape[0] != len(queries):
        raise ValueError(f"ranks has {r.shape[0]} query rows but {len(queries)} query images are given")
    topk = _check_int(topk, "topk", 1)
    tile, frame, gap = _check_int(tile, "tile", 8), _check_int(frame, "frame", 0), _check_int(gap, "gap", 0)
    query_gap, caption = _check_int(query_gap, "query_gap", 0), _check_int(caption, "caption", 0)
    dpi = _check_dpi(dpi)
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != r.shape:
            raise ValueError(f"scores must have the shape of ranks {r.shape}, got {scores.shape}")
    marks = None if gnd is None else result_marks(r, gnd, n_db=n_db, protocol=protocol)
    if rows is None:
        rows = list(range(r.shape[0]))
    else:
        rows = [_check_int(q, "rows[i]", 0) for q in rows]
        if not rows or max(rows) >= r.shape[0]:
            raise ValueError(f"rows must be a non-empty list of query rows in [0, {r.shape[0]})")
    query_names = _names(query_names, len(queries), "query_names")
    db_names = _names(db_names, n_db, "db_names")
    if title and gap < caption:
        gap = caption
    k = min(topk, r.shape[1])
    cell = tile + 2 * frame
    width = gap + (k + 1) * cell + k * gap + query_gap + gap
    height = gap + len(rows) * (caption + cell + gap)

    def x0(c):
        return gap + c * (cell + gap) + (query_gap if c > 0 else 0)

    def y0(i):
        return gap + i * (caption + cell + gap) + caption

    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = BACKGROUND
    cache = {}

    def fitted(src, where):
        key = src if isinstance(src, (str, os.PathLike)) else id(src)
        if key not in cache:
            cache[key] = _fit(load_image(src, where=where), tile)
        return cache[key]

    texts = []
    for i, q in enumerate(rows):
        for c in range(k + 1):
            x, y = x0(c), y0(i)
            if c == 0:
                img, color = fitted(queries[q], f"queries[{q}]"), COLORS["query"]
                prefix, name = "", query_names[q] if query_names else f"query {q}"
            else:
                d = int(r[q, c - 1])
                if d < 0:
                    continue
                img = fitted(database[d], f"database[{d}]")
                mark = "" if marks is None else marks[q, c - 1]
                color = COLORS[mark] if mark else BACKGROUND
                prefix = f"#{c} " + (f"{scores[q, c - 1]:.3g} " if scores is not None else "")
                name = db_names[d] if db_names else f"id {d}"
            canvas[y:y + cell, x:x + cell] = color
            canvas[y + frame:y + frame + tile, x + frame:x + frame + tile] = img
            if caption:
                texts.append((x, y - caption / 2, prefix, name))

    fig = _figure(width, height, dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="none", aspect="auto", extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    font_px = max(1.0, 0.7 * caption)
    fontsize = font_px * 72 / dpi
    n_chars = max(4, int(cell / (0.55 * font_px)))  # DejaVu Sans: about 0.55 em per character
    for x, y, prefix, name in texts:  # long names lose their start; the rank and score stay
        ax.text(x, y, prefix + _short(name, max(4, n_chars - len(prefix))), fontsize=fontsize, va="center",
                ha="left", clip_on=True)
    if title:
        ax.text(width / 2, gap / 2, title, fontsize=fontsize, va="center", ha="center")
    return _save_png(fig, out, dpi=dpi)


# ---------------------------------------------------------------------------------------------------------
# score heat map


def block_max(scores, max_cells: int):
    """``(reduced, (fr, fc))``: the maximum over ``fr x fc`` blocks of ``scores`` (partial edge blocks too),
    with the smallest factors that leave at most ``max_cells`` rows and columns (``1`` when already small)."""
    s = np.asarray(scores)
    max_cells = _check_int(max_cells, "max_cells", 1)
    fr, fc = max(1, math.ceil(s.shape[0] / max_cells)), max(1, math.ceil(s.shape[1] / max_cells))
    if fr == 1 and fc == 1:
        return s, (1, 1)
    nr, nc = math.ceil(s.shape[0] / fr), math.ceil(s.shape[1] / fc)
    padded = np.full((nr * fr, nc * fc), -np.inf, np.float64)
    padded[:s.shape[0], :s.shape[1]] = s
    return padded.reshape(nr, fr, nc, fc).max(axis=(1, 3)), (fr, fc)


def score_heatmap(scores, out, *, row_names=None, col_names=None, max_cells: int = 400, names_max: int = 40,
                  title: str | None = None, label: str = "score", cmap: str = "viridis", vmin=None, vmax=None,
                  size=(8.0, 6.5), dpi: float = 100) -> str:
    """Write a PNG heat map of a ``[n_query, n_db]`` score matrix, with a colorbar.

    Args:
        scores: the matrix (``jasmk.score_matrix``); finite values.
        out: the ``.png`` path (written atomically; an existing file is replaced only if it is a PNG).
        row_names, col_names: optional names put on the axes when an axis has at most ``names_max`` entries
            (and is not downsampled).
        max_cells: an axis longer than this is reduced by :func:`block_max` (a strong score stays visible);
            the axes keep the original indices.
        title, label, cmap, vmin, vmax: title, colorbar label, colormap and its limits (default: data range).
        size, dpi: figure size in inches and resolution: the PNG is ``size * dpi`` pixels.

    Returns:
        ``out``.
    """
    out = check_out_path(out)
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise ValueError(f"scores must be a non-empty [n_query, n_db] matrix, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    names_max = _check_int(names_max, "names_max", 0)
    dpi = _check_dpi(dpi)
    try:
        w_in, h_in = (float(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height) in inches, got {size!r}") from None
    if not (w_in > 0 and h_in > 0 and math.isfinite(w_in * h_in)):
        raise ValueError(f"size must be positive (width, height) in inches, got {size!r}")
    row_names = _names(row_names, s.shape[0], "row_names")
    col_names = _names(col_names, s.shape[1], "col_names")
    reduced, (fr, fc) = block_max(s, max_cells)
    if fr > 1 or fc > 1:
        log.debug("score matrix %s shown as %s block maxima (%d x %d blocks)", s.shape, reduced.shape, fr, fc)

    fig = _figure(w_in * dpi, h_in * dpi, dpi)
    ax = fig.add_subplot(1, 1, 1)
    ext_r, ext_c = reduced.shape[0] * fr, reduced.shape[1] * fc
    im = ax.imshow(reduced, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto",
                   extent=(-0.5, ext_c - 0.5, ext_r - 0.5, -0.5))
    ax.set_xlim(-0.5, s.shape[1] - 0.5)
    ax.set_ylim(s.shape[0] - 0.5, -0.5)
    fig.colorbar(im, ax=ax, label=label)
    shown = "" if fr == 1 and fc == 1 else f" (max over {fr}x{fc} blocks)"
    ax.set_xlabel("database image")
    ax.set_ylabel("query image")
    if col_names and fc == 1 and s.shape[1] <= names_max:
        ax.set_xticks(range(s.shape[1]), [_short(n, 24) for n in col_names], rotation=90, fontsize=7)
    if row_names and fr == 1 and s.shape[0] <= names_max:
        ax.set_yticks(range(s.shape[0]), [_short(n, 24) for n in row_names], fontsize=7)
    ax.set_title((title or f"scores {s.shape[0]} x {s.shape[1]}") + shown, fontsize=10)
    fig.tight_layout()
    return _save_png(fig, out, dpi=dpi)

__all__ = ["BACKGROUND", "COLORS", "TILE_BACKGROUND", "block_max", "check_out_path", "load_image", "result_marks",
           "results_grid", "score_heatmap"]
