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
keep their aspect ratio, centred in the tile. The caption band ``[y - caption, y)`` above a cell holds its name
and, on a second line, its rank and score (one line when the band is under 18 pixels), cut in the middle to the
cell's width, as measured by the renderer.

Score heat maps show the scores scaled per row by default (:func:`scaled_scores`), so that the images of a
query's scene stand out beside its self-match; ``scale="log"`` and ``scale="linear"`` show them otherwise.
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


MISSING_MATPLOTLIB = 'jasmk\'s pictures need matplotlib: pip install "jasmk[show]"'


def _matplotlib():
    """``(Figure, FigureCanvasAgg)``, the one place matplotlib is imported. Without matplotlib: a
    ``ModuleNotFoundError`` (an ``ImportError``) saying how to install it, :data:`MISSING_MATPLOTLIB`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ModuleNotFoundError(f"{MISSING_MATPLOTLIB} ({exc})", name=getattr(exc, "name", None)) from exc
    return Figure, FigureCanvasAgg


def _pil_image():
    """``PIL.Image`` (Pillow comes with matplotlib), or an ``ImportError`` saying how to install it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ModuleNotFoundError(f"{MISSING_MATPLOTLIB} (and Pillow, which it depends on) ({exc})",
                                  name=getattr(exc, "name", None)) from exc
    return Image


def _figure(width_px, height_px, dpi):
    """A matplotlib Figure on an Agg canvas (no pyplot, no global backend change)."""
    figure, canvas = _matplotlib()
    fig = figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    canvas(fig)
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
        Image = _pil_image()

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
    Image = _pil_image()

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
    names = [_one_line(x) for x in names]
    if len(names) != n:
        raise ValueError(f"{what} must list {n} names, got {len(names)}")
    return names


def _one_line(text) -> str:
    return "".join(" " if ch.isspace() else ch for ch in str(text))


def _short(text: str, n_chars: int) -> str:
    """``text`` cut to at most ``n_chars`` characters by an ellipsis in the middle: the start (a scene label, say)
    keeps two thirds of the room, the end (the extension) the rest: ``scene_07_view_03.jpg`` -> ``scene_07…jpg``."""
    if len(text) <= n_chars:
        return text
    if n_chars <= 1:
        return "\u2026" if n_chars == 1 else ""
    tail = (n_chars - 1) // 3
    return text[:n_chars - 1 - tail] + "\u2026" + (text[len(text) - tail:] if tail else "")


def _fit_width(text: str, max_px: float, width) -> str:
    """The longest :func:`_short` cut of ``text`` whose ``width(...)`` in pixels is at most ``max_px`` (``""``
    when not even the ellipsis fits)."""
    if not text or width(text) <= max_px:
        return text
    lo, hi = 0, len(text) - 1  # _short(text, 0) == "" fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if width(_short(text, mid)) <= max_px:
            lo = mid
        else:
            hi = mid - 1
    return _short(text, lo)


class _Texts:
    """Single-line texts on an axes whose data units are pixels (y down), each kept inside a box: the font is
    sized to the box height and the text cut in the middle (:func:`_short`) to the box width, both measured with
    the figure's renderer."""

    PROBE = "\u00c5\u00c9gjpq|()"  # tall and deep glyphs: a line of file name text is no higher than this

    def __init__(self, ax, dpi):
        self.ax, self.dpi = ax, dpi
        self.renderer = ax.figure.canvas.get_renderer()

    def text(self, x, y, s, **kw):
        return self.ax.text(x, y, s, parse_math=False, usetex=False, **kw)

    def font_px(self, height_px: float) -> float:
        """The font size in pixels whose tallest line (:attr:`PROBE`) is ``height_px`` high."""
        probe = self.text(0, 0, self.PROBE, fontsize=10 * 72 / self.dpi)
        h = probe.get_window_extent(self.renderer).height
        probe.remove()
        return 10 * max(height_px, 0.0) / max(h, 1e-9)

    def put(self, x, y, box_w, box_h, prefix, body, font_px, *, shorter=(), ha="left", gid=None):
        """``prefix + body`` in the box ``[x, x + box_w] x [y - box_h / 2, y + box_h / 2]`` (``ha="center"``: ``x``
        is the middle); ``body`` is cut in the middle to fit. When that cannot be done (not even the ellipsis fits
        after the prefix) or a ``body`` without prefix does not fit whole and ``shorter`` texts are given, the
        first of ``shorter`` that fits whole is drawn, else the last one (or the prefix) cut: numbers are not cut
        while a shorter form fits. The Text, or None when nothing fits."""
        t = self.text(x, y, "", fontsize=font_px * 72 / self.dpi, va="center", ha=ha, clip_on=True, gid=gid)
        for _ in range(4):
            prop = t.get_fontproperties()

            def width(s, prop=prop):
                return self.renderer.get_text_width_height_descent(s, prop, ismath=False)[0] if s else 0.0

            s = None
            if prefix and width(prefix + "\u2026") <= box_w:
                s = prefix + _fit_width(body, box_w, lambda b: width(prefix + b))
            elif not prefix and (not shorter or width(body) <= box_w):
                s = _fit_width(body, box_w, width)
            if s is None:
                s = next((c for c in shorter if width(c) <= box_w), None)
                s = s or _fit_width(shorter[-1] if shorter else prefix.rstrip(), box_w, width)
            if not s:
                break
            t.set_text(s)
            ext = t.get_window_extent(self.renderer)
            if ext.height <= box_h and ext.width <= box_w:
                return t
            t.set_fontsize(t.get_fontsize() * 0.97 * min(box_h / ext.height, 1.0))  # a glyph taller than the probe
        t.remove()
        return None


def results_grid(queries, database, ranks, out, *, gnd=None, protocol: str = "medium", scores=None, topk: int = 5,
                 rows=None, query_names=None, db_names=None, tile: int = 128, frame: int = 6, gap: int = 6,
                 query_gap: int = 18, caption: int = 28, dpi: float = 100, title: str | None = None) -> str:
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
        tile, frame, gap, query_gap, caption: the pixel layout (module docstring). A ``caption`` band of at least
            18 pixels holds two lines above each image, its name and below it the rank and score (``#2  0.0123``);
            a lower band holds one line, ``#2 0.0123 name``. Names too wide for the cell are cut in the middle
            (``scene_07_vi…jpg``: the start and the extension stay).
        dpi: only sets the caption font size in points; the picture is exactly the pixel size of the layout.
        title: optional text in the top gap (``gap`` is raised to fit it).

    Returns:
        ``out``.
    """
    _matplotlib()
    out = check_out_path(out)
    fig = _grid_figure(queries, database, ranks, gnd=gnd, protocol=protocol, scores=scores, topk=topk, rows=rows,
                       query_names=query_names, db_names=db_names, tile=tile, frame=frame, gap=gap,
                       query_gap=query_gap, caption=caption, dpi=dpi, title=title)
    return _save_png(fig, out, dpi=fig.dpi)


MIN_FONT_PX = 7.0  # smaller caption text is not readable: the caption band then holds one line


def _grid_figure(queries, database, ranks, *, gnd, protocol, scores, topk, rows, query_names, db_names, tile, frame,
                 gap, query_gap, caption, dpi, title):
    """The Figure (Agg canvas) that :func:`results_grid` saves. Caption texts have the gid
    ``"caption <shown row> <column> <line>"`` (column 0 is the query), the title ``"title"``."""
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
    title = _one_line(title) if title else None
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

    captions = []  # (shown row, column, x, caption band top, rank and score, shorter forms of it, name)
    for i, q in enumerate(rows):
        for c in range(k + 1):
            x, y = x0(c), y0(i)
            if c == 0:
                img, color = fitted(queries[q], f"queries[{q}]"), COLORS["query"]
                rank, alts, name = "", (), query_names[q] if query_names else f"query {q}"
            else:
                d = int(r[q, c - 1])
                if d < 0:
                    continue
                img = fitted(database[d], f"database[{d}]")
                mark = "" if marks is None else marks[q, c - 1]
                color = COLORS[mark] if mark else BACKGROUND
                score = "" if scores is None else f"{scores[q, c - 1]:.3g}"
                rank = f"#{c}  {score}" if score else f"#{c}"
                alts = (score, f"#{c}") if score else ()
                name = db_names[d] if db_names else f"id {d}"
            canvas[y:y + cell, x:x + cell] = color
            canvas[y + frame:y + frame + tile, x + frame:x + frame + tile] = img
            if caption:
                captions.append((i, c, x, y - caption, rank, alts, name))

    fig = _figure(width, height, dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="none", aspect="auto", extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    texts = _Texts(ax, dpi)
    box_w = max(cell - 2, 1)  # a pixel of air on either side of the cell
    font_px = 0.0
    if caption:
        two_px = min(0.8 * caption / 2, texts.font_px(caption / 2 - 1))
        two = two_px >= MIN_FONT_PX
        font_px = two_px if two else min(0.7 * caption, texts.font_px(caption - 1))
        for i, c, x, top, rank, alts, name in captions if font_px >= 1 else ():
            if two:  # the name, and below it the rank and score
                texts.put(x + 1, top + caption / 4, box_w, caption / 2, "", name, font_px, gid=f"caption {i} {c} 0")
                if rank:
                    texts.put(x + 1, top + 3 * caption / 4, box_w, caption / 2, "", rank, font_px, shorter=alts,
                              gid=f"caption {i} {c} 1")
            else:  # long names lose their middle; the rank and score stay
                one = " ".join(rank.split())
                texts.put(x + 1, top + caption / 2, box_w, caption, one + " " if one else "", name, font_px,
                          shorter=(one, *alts) if one else (), gid=f"caption {i} {c} 0")
    if title:
        title_px = min(font_px or 0.7 * gap, texts.font_px(gap - 1))
        if title_px >= 1:
            texts.put(width / 2, gap / 2, width - 2, gap, "", title, title_px, ha="center", gid="title")
    return fig


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


SCALES = ("row", "log", "linear")
LOG_DECADES = 4  # scale="log" shows at most this many decades below the largest score


def _check_scores(scores) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise ValueError(f"scores must be a non-empty [n_query, n_db] matrix, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return s


def _self_match(shape) -> bool:
    """Whether the diagonal of a score matrix of ``shape`` is taken as the self-matches (square, n > 1)."""
    return shape[0] == shape[1] > 1


def scaled_scores(scores, scale: str = "row") -> np.ndarray:
    """The ``[n_query, n_db]`` float64 values that :func:`score_heatmap` draws for ``scores`` under ``scale``.

    - ``"row"``: each row divided by its largest score other than the self-match, and clipped to ``[0, 1]``:
      a query's best other image is 1, the self-match (above it) is clipped to 1 and a score a hundred times
      weaker than the best is 0.01. A square matrix (``n > 1``, as ``jasmk score-matrix`` writes for the
      database against itself) has its diagonal taken as the self-matches and left out of the row maximum;
      if a square matrix's queries are not the database images, a row's diagonal entry is merely clipped to 1
      when it beats the rest. Other matrices are divided by the row maximum. A row whose maximum is ``<= 0``
      is 0 throughout, negative scores are 0. Rows are not comparable: a row of noise has its best at 1 too
      (``"log"`` compares absolute scores).
    - ``"log"``: ``log10(max(score, floor))`` with ``floor`` the smallest positive score, but at least
      ``10 ** -LOG_DECADES`` times the largest (:data:`LOG_DECADES` decades); a matrix without a positive
      score is 0 throughout.
    - ``"linear"``: the scores as they are.

    Raises ValueError for an unknown ``scale``, a matrix that is not 2-D real, or NaN / inf scores.
    """
    if not isinstance(scale, str) or scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(map(repr, SCALES))}, got {scale!r}")
    s = _check_scores(scores)
    if scale == "linear":
        return s
    if scale == "log":
        positive = s[s > 0]
        if not positive.size:
            return np.zeros_like(s)
        floor = max(float(positive.min()), float(positive.max()) * 10.0 ** -LOG_DECADES)
        return np.log10(np.maximum(s, floor))
    others = s
    if _self_match(s.shape):
        others = s.copy()
        np.fill_diagonal(others, -np.inf)
    top = others.max(axis=1, keepdims=True)
    with np.errstate(over="ignore"):
        out = np.where(top > 0, s / np.where(top > 0, top, 1.0), 0.0)
    return np.clip(out, 0.0, 1.0)


def scale_label(scale: str, shape) -> str:
    """The colorbar label of :func:`scaled_scores` values under ``scale`` for a matrix of ``shape``."""
    if scale == "row":
        return "score / row max (self excluded)" if _self_match(shape) else "score / row max"
    return "log10 score" if scale == "log" else "score"


def score_heatmap(scores, out, *, scale: str = "row", row_names=None, col_names=None, max_cells: int = 400,
                  names_max: int = 40, title: str | None = None, label: str | None = None, cmap: str = "viridis",
                  vmin=None, vmax=None, size=(8.0, 6.5), dpi: float = 100) -> str:
    """Write a PNG heat map of a ``[n_query, n_db]`` score matrix, with a colorbar.

    Args:
        scores: the matrix (``jasmk.score_matrix``); finite values.
        out: the ``.png`` path (written atomically; an existing file is replaced only if it is a PNG).
        scale: what the colours show (:func:`scaled_scores`): ``"row"`` (default) each score over its row's
            largest score other than the self-match (the diagonal of a square matrix), clipped to ``[0, 1]``,
            so that same-scene images stand out beside self-matches far stronger than they are; ``"log"``
            ``log10`` of the score (floored, at most :data:`LOG_DECADES` decades); ``"linear"`` the score.
        row_names, col_names: optional names put on the axes when an axis has at most ``names_max`` entries
            (and is not downsampled).
        max_cells: an axis longer than this is reduced by :func:`block_max` of the scaled values (a strong score
            stays visible); the axes keep the original indices.
        title, label, cmap, vmin, vmax: title, colorbar label (default :func:`scale_label`), colormap and its
            limits on the scaled values (default: ``[0, 1]`` for ``"row"``, else the data range).
        size, dpi: figure size in inches and resolution: the PNG is ``size * dpi`` pixels.

    Returns:
        ``out``.
    """
    _matplotlib()
    out = check_out_path(out)
    fig = _heatmap_figure(scores, scale=scale, row_names=row_names, col_names=col_names, max_cells=max_cells,
                          names_max=names_max, title=title, label=label, cmap=cmap, vmin=vmin, vmax=vmax, size=size,
                          dpi=dpi)
    return _save_png(fig, out, dpi=fig.dpi)


def _heatmap_figure(scores, *, scale, row_names, col_names, max_cells, names_max, title, label, cmap, vmin, vmax,
                    size, dpi):
    """The Figure (Agg canvas) that :func:`score_heatmap` saves; its first axes' image holds the drawn values."""
    s = _check_scores(scores)
    shown_values = scaled_scores(s, scale)
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
    reduced, (fr, fc) = block_max(shown_values, max_cells)  # after the scaling: a strong score stays visible
    if fr > 1 or fc > 1:
        log.debug("score matrix %s shown as %s block maxima (%d x %d blocks)", s.shape, reduced.shape, fr, fc)
    if scale == "row":
        vmin = 0.0 if vmin is None else vmin
        vmax = 1.0 if vmax is None else vmax

    fig = _figure(w_in * dpi, h_in * dpi, dpi)
    ax = fig.add_subplot(1, 1, 1)
    ext_r, ext_c = reduced.shape[0] * fr, reduced.shape[1] * fc
    im = ax.imshow(reduced, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto",
                   extent=(-0.5, ext_c - 0.5, ext_r - 0.5, -0.5))
    ax.set_xlim(-0.5, s.shape[1] - 0.5)
    ax.set_ylim(s.shape[0] - 0.5, -0.5)
    fig.colorbar(im, ax=ax, label=scale_label(scale, s.shape) if label is None else label)
    shown = "" if fr == 1 and fc == 1 else f" (max over {fr}x{fc} blocks)"
    ax.set_xlabel("database image")
    ax.set_ylabel("query image")
    if col_names and fc == 1 and s.shape[1] <= names_max:
        ax.set_xticks(range(s.shape[1]), [_short(n, 24) for n in col_names], rotation=90, fontsize=7)
    if row_names and fr == 1 and s.shape[0] <= names_max:
        ax.set_yticks(range(s.shape[0]), [_short(n, 24) for n in row_names], fontsize=7)
    ax.set_title((title or f"scores {s.shape[0]} x {s.shape[1]}") + shown, fontsize=10)
    fig.tight_layout()
    return fig


__all__ = ["BACKGROUND", "COLORS", "LOG_DECADES", "MISSING_MATPLOTLIB", "SCALES", "TILE_BACKGROUND", "block_max",
           "check_out_path", "load_image", "result_marks", "results_grid", "scale_label", "scaled_scores",
           "score_heatmap"]
