"""jasmk.show pictures and the ``jasmk show`` command: the PNGs are read back and their pixels checked against
the ground truth (frame colours) and the rankings (which image sits in which cell)."""

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib import image as mpimg  # noqa: E402

from jasmk import cli, show  # noqa: E402

# layout used below (module docstring of jasmk.show)
TILE, FRAME, GAP, QGAP, CAP = 40, 5, 4, 12, 12


def cell_origin(row, col):
    cell = TILE + 2 * FRAME
    x = GAP + col * (cell + GAP) + (QGAP if col > 0 else 0)
    y = GAP + row * (CAP + cell + GAP) + CAP
    return y, x


def read_rgb(path):
    a = mpimg.imread(path)
    if a.dtype != np.uint8:
        a = np.rint(a * 255).astype(np.int64)
    return a[..., :3].astype(np.int64)


def colour_name(px):
    r, g, b = (int(v) for v in px)
    if r > 245 and g > 245 and b > 245:
        return "white"
    if g > 140 and r < 60 and b < 60:
        return "green"
    if r > 180 and g < 70 and b < 70:
        return "red"
    if r > 200 and g > 150 and b < 60:
        return "yellow"
    if b > 180 and r < 80 and g < 140:
        return "blue"
    return f"other{(r, g, b)}"


def frame_colours(pic, row, col):
    """The colour names at the middle of the four frame bars of a cell (all four must agree)."""
    y, x = cell_origin(row, col)
    cell, mid, f = TILE + 2 * FRAME, (TILE + 2 * FRAME) // 2, FRAME // 2
    names = {colour_name(pic[y + mid, x + f]), colour_name(pic[y + mid, x + cell - 1 - f]),
             colour_name(pic[y + f, x + mid]), colour_name(pic[y + cell - 1 - f, x + mid])}
    assert len(names) == 1, (row, col, names)
    return names.pop()


def tile_centre(pic, row, col):
    y, x = cell_origin(row, col)
    c = FRAME + TILE // 2
    return pic[y + c, x + c]


def solid_images(n, rng):
    """``n`` solid-colour images of various shapes with well separated colours (neither frame colour nor white)."""
    colours = []
    while len(colours) < n:
        c = rng.integers(40, 200, 3)
        if all(np.abs(c - o).max() > 25 for o in colours):
            colours.append(c)
    shapes = [(30 + 7 * i % 50, 30 + 11 * i % 60) for i in range(n)]
    return [np.broadcast_to(c.astype(np.uint8), s + (3,)).copy() for c, s in zip(colours, shapes)], colours


def expected_mark(d, g, protocol):
    """Independent of jasmk.evaluation: the revisited protocols spelled out."""
    easy, hard, junk = set(g["easy"]), set(g["hard"]), set(g.get("junk", []))
    pos = {"easy": easy, "medium": easy | hard, "hard": hard}[protocol]
    ign = {"easy": junk | hard, "medium": junk, "hard": junk | easy}[protocol]
    return "green" if d in pos else ("yellow" if d in ign else "red")


def grid(queries, db, ranks, out, **kw):
    return show.results_grid(queries, db, ranks, out, tile=TILE, frame=FRAME, gap=GAP, query_gap=QGAP,
                             caption=CAP, **kw)


@pytest.fixture
def toy():
    rng = np.random.default_rng(3)
    db, colours = solid_images(12, rng)
    ranks = np.array([[0, 5, 2, 9, 1], [7, 3, 4, 11, 6], [10, 8, -1, -1, -1]])
    gnd = [{"easy": [0], "hard": [2, 6], "junk": [5]},
           {"easy": [3], "hard": [7], "junk": [11, 2]},
           {"easy": [], "hard": [8], "junk": [10]}]
    queries = [db[0], db[7], np.zeros((20, 30), np.uint8)]  # a gray query too
    return queries, db, colours, ranks, gnd


@pytest.mark.parametrize("protocol", ["medium", "easy", "hard"])
def test_results_grid_layout_and_frames(tmp_path, toy, protocol):
    queries, db, colours, ranks, gnd = toy
    out = grid(queries, db, ranks, str(tmp_path / "grid.png"), gnd=gnd, protocol=protocol, topk=4,
               scores=np.linspace(1, 0, ranks.size).reshape(ranks.shape))
    assert out == str(tmp_path / "grid.png")
    pic = read_rgb(out)
    cell, k = TILE + 2 * FRAME, 4
    assert pic.shape[:2] == (GAP + 3 * (CAP + cell + GAP), GAP + (k + 1) * cell + k * GAP + QGAP + GAP)
    seen = set()
    for q in range(3):
        assert frame_colours(pic, q, 0) == "blue"
        for c in range(1, k + 1):
            d = ranks[q, c - 1]
            if d < 0:  # empty slot: nothing drawn
                y, x = cell_origin(q, c)
                assert (pic[y:y + cell, x:x + cell] == 255).all()
                continue
            want = expected_mark(d, gnd[q], protocol)
            assert frame_colours(pic, q, c) == want, (q, c, d, protocol)
            seen.add(want)
            # the cell shows database image d (solid colour, resizing keeps it)
            np.testing.assert_allclose(tile_centre(pic, q, c), colours[d], atol=2)
    assert seen == {"green", "red", "yellow"}  # all three marks are exercised
    assert ranks[0, 4] == 1 and pic.shape[1] < cell_origin(0, 5)[1] + cell  # topk=4 cut the fifth result
    np.testing.assert_allclose(tile_centre(pic, 1, 0), colours[7], atol=2)
    np.testing.assert_allclose(tile_centre(pic, 2, 0), 0, atol=2)


def test_result_marks_match_the_protocols(toy):
    _, db, _, ranks, gnd = toy
    names = {"green": "correct", "red": "wrong", "yellow": "junk"}
    for protocol in ("easy", "medium", "hard"):
        marks = show.result_marks(ranks, gnd, n_db=len(db), protocol=protocol)
        for q, c in np.ndindex(ranks.shape):
            d = ranks[q, c]
            assert marks[q, c] == ("" if d < 0 else names[expected_mark(d, gnd[q], protocol)])


def test_results_grid_without_gnd_has_no_marks_and_reads_files(tmp_path, toy):
    from PIL import Image

    queries, db, colours, ranks, _ = toy
    paths = []
    for i, img in enumerate(db):
        p = tmp_path / f"im{i}.{'png' if i % 3 == 0 else 'jpg'}"
        Image.fromarray(img).save(p, quality=95)
        if i % 3 == 1:  # gzip-compressed, as Debian ships some pictures
            p.with_suffix(".jpg.gz").write_bytes(gzip.compress(p.read_bytes()))
            p.unlink()
            p = p.with_suffix(".jpg.gz")
        paths.append(str(p))
    out = grid([paths[0], paths[7], queries[2]], paths, ranks, tmp_path / "plain.png", rows=[1, 0])
    pic = read_rgb(out)
    for i, q in enumerate([1, 0]):  # rows shown in the order asked for
        assert frame_colours(pic, i, 0) == "blue"
        for c in range(1, 6):
            assert frame_colours(pic, i, c) == "white"
            np.testing.assert_allclose(tile_centre(pic, i, c), colours[ranks[q, c - 1]], atol=4)


def test_results_grid_bad_input(tmp_path, toy):
    queries, db, _, ranks, gnd = toy
    out = str(tmp_path / "g.png")
    with pytest.raises(ValueError, match="only 12 database images"):
        grid(queries, db, np.where(ranks == 9, 12, ranks), out)
    with pytest.raises(ValueError, match="one per query row"):
        grid(queries, db, ranks, out, gnd=gnd[:2])
    with pytest.raises(ValueError, match="outside"):
        grid(queries, db, ranks, out, gnd=[{"easy": [40], "hard": []}] + gnd[1:])
    with pytest.raises(ValueError, match="protocol"):
        grid(queries, db, ranks, out, gnd=gnd, protocol="medum")
    with pytest.raises(ValueError, match="3 query rows but 2"):
        grid(queries[:2], db, ranks, out)
    with pytest.raises(ValueError, match=r"\.png"):
        grid(queries, db, ranks, str(tmp_path / "g.jpg"))
    with pytest.raises(ValueError, match="no such image"):
        grid(queries, [str(tmp_path / "missing.jpg")] * 12, ranks, out)
    (tmp_path / "notes.png").write_text("my notes")
    with pytest.raises(ValueError, match="not a PNG"):
        grid(queries, db, ranks, str(tmp_path / "notes.png"))
    assert (tmp_path / "notes.png").read_text() == "my notes"
    assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # a PNG jasmk wrote is replaced
    grid(queries, db, ranks, out)
    grid(queries, db, ranks[:, :2], out, topk=2)
    assert read_rgb(out).shape[1] == GAP + 3 * (TILE + 2 * FRAME) + 2 * GAP + QGAP + GAP


def test_block_max_against_loops():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((23, 10))
    red, (fr, fc) = show.block_max(s, 5)
    assert (fr, fc) == (5, 2) and red.shape == (5, 5)
    for i, j in np.ndindex(red.shape):
        assert red[i, j] == s[i * fr:(i + 1) * fr, j * fc:(j + 1) * fc].max()
    same, f = show.block_max(s, 30)
    assert f == (1, 1) and np.array_equal(same, s)
    odd, f = show.block_max(np.arange(7.0)[None], 3)  # a partial edge block keeps its own maximum
    assert f == (1, 3) and odd.tolist() == [[2.0, 5.0, 6.0]]


def test_heatmap_size_and_hot_cell_survives_downsampling(tmp_path):
    from matplotlib import colormaps

    s = np.zeros((2000, 300))
    s[1234, 17] = 1.0
    out = show.score_heatmap(s, tmp_path / "hm.png", size=(6, 4), dpi=50, max_cells=100)
    pic = read_rgb(out)
    assert pic.shape[:2] == (200, 300)
    top = np.rint(np.array(colormaps["viridis"](1.0)[:3]) * 255)
    low = np.rint(np.array(colormaps["viridis"](0.0)[:3]) * 255)
    is_top = (np.abs(pic - top).max(axis=2) <= 3)
    is_low = (np.abs(pic - low).max(axis=2) <= 3)
    # the matrix area (viridis(0) pixels) holds a hot cell, besides the colorbar's top end
    ys, xs = np.nonzero(is_low)
    area = is_top[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert area.any()
    # its place in the area matches the hot score's place in the matrix
    hy, hx = np.nonzero(area)
    assert abs(hy.mean() / area.shape[0] - 1234 / 2000) < 0.03 and abs(hx.mean() / area.shape[1] - 17 / 300) < 0.03
    # names on small matrices; bad input
    show.score_heatmap(np.eye(3), tmp_path / "small.png", row_names=list("abc"), col_names=list("xyz"))
    with pytest.raises(ValueError, match="3 names"):
        show.score_heatmap(np.eye(3), tmp_path / "small.png", row_names=["a"])
    with pytest.raises(ValueError, match="NaN"):
        show.score_heatmap(np.full((2, 2), np.nan), tmp_path / "nan.png")
    with pytest.raises(ValueError, match="matrix"):
        show.score_heatmap(np.ones(4), tmp_path / "vec.png")
    assert not (tmp_path / "nan.png").exists()


def scene_matrix(n=9, per_scene=3, self_score=0.3, same=0.01, other=1e-4):
    """A square score matrix: self-matches ``self_score``, same scene ``same``, other scenes ``other``."""
    scene = np.arange(n) // per_scene
    s = np.where(scene[:, None] == scene[None], same, other)
    np.fill_diagonal(s, self_score)
    return s, scene[:, None] == scene[None]


HEATMAP_KW = dict(row_names=None, col_names=None, max_cells=400, names_max=40, title=None, label=None,
                  cmap="viridis", vmin=None, vmax=None, size=(6, 4), dpi=50)


def drawn(s, scale, **kw):
    """The values and the [0, 1] colour positions of the heat map image that score_heatmap would save."""
    fig = show._heatmap_figure(s, scale=scale, **{**HEATMAP_KW, **kw})
    im = fig.axes[0].images[0]
    return np.asarray(im.get_array(), np.float64), np.asarray(im.norm(im.get_array()), np.float64), fig


def test_row_scale_shows_same_scene_scores_beside_self_matches():
    s, same = scene_matrix()
    off = same & ~np.eye(len(s), dtype=bool)
    row = show.scaled_scores(s)  # "row" is the default
    assert row.shape == s.shape and row.dtype == np.float64
    np.testing.assert_allclose(row[off], 1.0)  # a query's best other image
    np.testing.assert_allclose(row[~same], 0.01)  # a hundred times weaker
    np.testing.assert_allclose(np.diag(row), 1.0)  # the self-match, clipped
    # what is drawn: the same values at the same colour positions (limits [0, 1])
    values, colour, fig = drawn(s, "row")
    np.testing.assert_allclose(values, row)
    np.testing.assert_allclose(colour[off], 1.0)
    np.testing.assert_allclose(colour[~same], 0.01, atol=1e-12)
    assert fig.axes[1].get_ylabel() == "score / row max (self excluded)"
    # linear (the old picture): same-scene scores sit at 3 % of the colour range, beside 0 for other scenes
    values, colour, fig = drawn(s, "linear")
    np.testing.assert_array_equal(values, s)
    np.testing.assert_allclose(colour[off], (0.01 - 1e-4) / (0.3 - 1e-4))
    assert abs(colour[off][0] - 0.033) < 1e-3 and fig.axes[1].get_ylabel() == "score"
    # an explicit label and colour limits win
    _, colour, fig = drawn(s, "row", label="mine", vmax=2.0)
    np.testing.assert_allclose(colour[off], 0.5)
    assert fig.axes[1].get_ylabel() == "mine"


def test_log_scale_is_monotone_and_floored():
    rng = np.random.default_rng(2)
    s, same = scene_matrix()
    log10 = show.scaled_scores(s, "log")
    np.testing.assert_allclose(log10[same & ~np.eye(9, dtype=bool)], -2.0)
    np.testing.assert_allclose(log10[~same], -4.0)
    np.testing.assert_allclose(np.diag(log10), np.log10(0.3))
    values, _, fig = drawn(s, "log")
    np.testing.assert_allclose(values, log10)
    assert fig.axes[1].get_ylabel() == "log10 score"
    # monotone in the score; zero and negative scores sit at the floor, at most LOG_DECADES below the top
    r = np.concatenate([rng.random(30) * 10.0 ** rng.integers(-9, 1, 30), [0.0, -1.0, 1e-12]])[None]
    out = show.scaled_scores(r, "log")[0]
    order = np.argsort(r[0], kind="stable")
    assert (np.diff(out[order]) >= 0).all() and np.isfinite(out).all()
    assert out.min() >= np.log10(r.max()) - show.LOG_DECADES - 1e-9
    assert out[-3] == out[-2] == out.min()
    small = show.scaled_scores([[1e-3, 2e-3, 0.0]], "log")[0]  # within LOG_DECADES: the smallest positive is the floor
    np.testing.assert_allclose(small, [-3.0, np.log10(2e-3), -3.0])
    np.testing.assert_array_equal(show.scaled_scores(np.zeros((2, 3)), "log"), 0.0)


def test_row_scale_edge_cases_and_bad_scale():
    # not square: each row over its own maximum (no self-match is assumed)
    r = show.scaled_scores([[0.2, 0.1, 0.05, 0.0], [0.0, 0.0, 0.0, -1.0], [-1.0, 2.0, 4.0, 1.0]])
    np.testing.assert_allclose(r, [[1.0, 0.5, 0.25, 0], [0, 0, 0, 0], [0.0, 0.5, 1.0, 0.25]])  # max <= 0: 0
    assert show.scale_label("row", (3, 4)) == "score / row max"
    # square: a row whose only positive score is the self-match stays 0, self-match included
    np.testing.assert_array_equal(show.scaled_scores(np.diag([0.3, 0.2])), 0.0)
    np.testing.assert_array_equal(show.scaled_scores([[0.5]]), [[1.0]])  # 1 x 1: no self-match to leave out
    np.testing.assert_array_equal(show.scaled_scores([[1, 3], [2, 0]], "linear"), [[1, 3], [2, 0]])
    for bad in ("Row", "lin", None, "", 1):
        with pytest.raises(ValueError, match="'row', 'log', 'linear'"):
            show.scaled_scores(np.eye(2), bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        show.scaled_scores([[1.0, np.inf]], "linear")


def test_row_scale_keeps_a_strong_cell_through_block_maxima(tmp_path):
    from matplotlib import colormaps

    n, hot = 1000, (700, 123)
    s = np.zeros((n, n))
    np.fill_diagonal(s, 0.3)
    s[hot] = 0.01  # the only score of query 700 besides its self-match
    values, colour, _ = drawn(s, "row", max_cells=100)
    assert values.shape == (100, 100)
    assert colour[70, 12] == 1.0 and colour[70, 70] == 1.0  # the hot cell's block, and its row's self-match
    assert colour.sum() == 2.0  # rows with nothing but a self-match stay 0, diagonal included
    _, colour, _ = drawn(s, "linear", max_cells=100)
    assert colour[70, 12] < 0.05  # drowned by the self-matches
    # end to end: the PNG shows the hot cell where it is in the matrix
    out = show.score_heatmap(s, tmp_path / "hm.png", size=(6, 5), dpi=80, max_cells=100)
    assert out == str(tmp_path / "hm.png")
    pic = read_rgb(out)
    top = np.rint(np.array(colormaps["viridis"](1.0)[:3]) * 255)
    low = np.rint(np.array(colormaps["viridis"](0.0)[:3]) * 255)
    is_top, is_low = (np.abs(pic - top).max(axis=2) <= 3), (np.abs(pic - low).max(axis=2) <= 3)
    ys = np.flatnonzero(is_low.sum(axis=1) > is_low.sum(axis=1).max() / 2)  # the matrix, not the colorbar's end
    xs = np.flatnonzero(is_low.sum(axis=0) > is_low.sum(axis=0).max() / 2)
    area = is_top[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = area.shape
    assert h > 250 and w > 250
    assert area[int(0.705 * h), int(0.125 * w)] and area[int(0.705 * h), int(0.705 * w)]
    assert not area[int(0.105 * h), int(0.105 * w)]  # a self-match without other scores
    assert area.mean() < 0.001
    with pytest.raises(ValueError, match="scale must be one of 'row', 'log', 'linear'"):
        show.score_heatmap(s, tmp_path / "bad.png", scale="sqrt")
    assert not (tmp_path / "bad.png").exists()


def test_short_cuts_the_middle():
    name = "scene_07_view_03.jpg"
    assert show._short(name, 20) == name and show._short(name, 12) == "scene_07\u2026jpg"
    for n in range(0, 21):
        cut = show._short(name, n)
        assert len(cut) <= n and (cut == name or n < 20)
        if n >= 5:
            assert cut.startswith(name[:3]) and cut[-1] == "g"
    assert show._fit_width(name, 10, len) == "scene_\u2026jpg" and show._fit_width(name, 0.5, len) == ""


GRID_KW = dict(gnd=None, protocol="medium", rows=None, query_names=None, tile=128, frame=6, gap=6, query_gap=18,
               caption=28, dpi=100, title=None, topk=5)


@pytest.mark.parametrize("layout", [{}, dict(tile=TILE, frame=FRAME, gap=GAP, query_gap=QGAP, caption=CAP),
                                    dict(dpi=200, caption=20, title="a long title " * 30),
                                    dict(tile=64, caption=40, dpi=72)])
def test_results_grid_captions_fit_their_cells(toy, layout):
    queries, db, _, ranks, _ = toy
    kw = {**GRID_KW, **layout}
    names = [f"scene_{i // 3:02d}_view_{i % 3:02d}.jpg" for i in range(len(db))]
    names[5] = "a_very_long_scene_label_for_the_cathedral_scene_11_view_02.jpeg"
    names[9] = "$x^2$ [not math] \u00c5ngstr\u00f6m\nview.png"
    scores = np.array([[0.312345, 0.0123456, 1.2345e-4, -1.5e-5, 12345.678]] * 3)
    fig = show._grid_figure(queries, db, ranks, scores=scores, db_names=names, **kw)
    renderer = fig.canvas.get_renderer()
    fw, fh = fig.canvas.get_width_height()
    t, cap, g = kw["tile"], kw["caption"], kw["gap"]
    if kw["title"] and g < cap:
        g = cap
    cell = t + 2 * kw["frame"]
    assert (fw, fh) == (g + 6 * cell + 5 * g + kw["query_gap"] + g, g + 3 * (cap + cell + g))
    texts = {x.get_gid(): x for x in fig.axes[0].texts}
    two = cap >= 18
    shown = [(i, c) for i in range(3) for c in range(6) if c == 0 or ranks[i, c - 1] >= 0]
    want = {f"caption {i} {c} {line}" for i, c in shown for line in ((0, 1) if two and c else (0,))}
    assert set(texts) == want | ({"title"} if kw["title"] else set())
    for gid, text in texts.items():
        box = text.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= fw and 0 <= box.y0 and box.y1 <= fh, (gid, box)
        if gid == "title":
            assert text.get_text().startswith("a long title") and fh - box.y0 <= g
            continue
        i, c, line = (int(v) for v in gid.split()[1:])
        x = g + c * (cell + g) + (kw["query_gap"] if c else 0)
        y = g + i * (cap + cell + g) + cap  # the cell's top; its caption band is [y - cap, y)
        top, bottom = (y - cap, y - cap / 2) if two and line == 0 else (y - cap / 2, y) if two else (y - cap, y)
        assert x <= box.x0 and box.x1 <= x + cell, (gid, text.get_text(), box, x, cell)  # inside its column
        assert fh - top >= box.y1 and box.y0 >= fh - bottom, (gid, text.get_text(), box, top, bottom)
        assert text.get_fontsize() * kw["dpi"] / 72 >= (show.MIN_FONT_PX if two else 1), gid
        s = text.get_text()
        assert "\n" not in s and s.strip()
        if c == 0:
            assert s == f"query {i}"  # all rows, in order
        elif two and line == 1:  # rank and score, or a shorter form of it: numbers are not cut
            score = f"{scores[i, c - 1]:.3g}"
            assert s in (f"#{c}  {score}", score, f"#{c}") and (s == f"#{c}  {score}" or cell < 100), s
        elif not two and not s.startswith(f"#{c} {scores[i, c - 1]:.3g} "):  # too narrow: rank and score only
            score = f"{scores[i, c - 1]:.3g}"
            assert s in (f"#{c} {score}", score, f"#{c}") and cell < 100, s
        else:
            name = names[ranks[i, c - 1]].replace("\n", " ")
            body = s if two else s.split(" ", 2)[-1]
            assert body == name or ("\u2026" in body and name.startswith(body.split("\u2026")[0])
                                    and name.endswith(body.split("\u2026")[1]))
            assert len(body.split("\u2026")[0]) >= (3 if cell >= 100 else 1)
    if layout == {}:  # the default layout shows scene_00_view_01.jpg, and its score, whole
        assert texts["caption 0 1 0"].get_text() == "scene_00_view_00.jpg"
        assert texts["caption 0 1 1"].get_text() == "#1  0.312"
        assert texts["caption 0 5 1"].get_text() == "#5  1.23e+04"
        assert texts["caption 0 2 0"].get_text().startswith("a_very_long_")
        assert texts["caption 0 2 0"].get_text().endswith(".jpeg")


@pytest.mark.parametrize("func", ["grid", "heatmap"])
def test_pictures_without_matplotlib_say_how_to_install_it(tmp_path, monkeypatch, toy, func):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now fails
    queries, db, _, ranks, _ = toy
    out = tmp_path / "pic.png"
    with pytest.raises(ImportError, match=re.escape('pip install "jasmk[show]"')) as exc:
        if func == "grid":
            show.results_grid(queries, db, ranks, out)
        else:
            show.score_heatmap(np.eye(3), out)
    assert isinstance(exc.value, ModuleNotFoundError)  # what the plain import raised: old excepts still work
    assert str(exc.value).startswith(show.MISSING_MATPLOTLIB)
    assert not out.exists()


@pytest.mark.slow
def test_import_jasmk_does_not_import_matplotlib():
    code = ("import sys, jasmk, jasmk.show, jasmk.cli; "
            "assert 'matplotlib' not in sys.modules and 'PIL' not in sys.modules, sorted(sys.modules)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ---------------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, small_data):
    """Query results and a score matrix written by ``jasmk query`` / ``jasmk score-matrix``, one solid-colour
    picture per database image, and a revisited gnd (same scene = positive)."""
    from PIL import Image

    feats, ids, _ = small_data
    d = tmp_path_factory.mktemp("show_cli")
    np.savez(d / "db.npz", feats=feats, ids=ids)
    np.save(d / "train.npy", feats)
    assert cli.main(["--quiet", "codebook", str(d / "train.npy"), "--size", "64", "--out", str(d / "cb")]) == 0
    assert cli.main(["--quiet", "index", str(d / "db.npz"), "--codebook", str(d / "cb"), "--out", str(d / "idx")]) == 0
    assert cli.main(["--quiet", "query", str(d / "idx"), str(d / "db.npz"), "--topk", "6",
                     "--out", str(d / "res.npz")]) == 0
    assert cli.main(["--quiet", "score-matrix", str(d / "idx"), str(d / "db.npz"), "--out", str(d / "S.npy")]) == 0
    n = 24
    imgs, colours = solid_images(n, np.random.default_rng(5))
    (d / "pics").mkdir()
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(d / "pics" / f"im{i:02d}.png")
    (d / "images.txt").write_text("".join(f"pics/im{i:02d}.png\n" for i in range(n)))  # relative to the list
    scene = np.arange(n) % 8  # clustered_data: image i sees scene i % (24 // 3)
    rng = np.random.default_rng(1)
    gnd = []
    for q in range(n):
        same = [int(i) for i in np.flatnonzero(scene == scene[q]) if i != q]
        other = [int(i) for i in np.flatnonzero(scene != scene[q])]
        gnd.append({"easy": same[:1], "hard": same[1:], "junk": [q] + rng.choice(other, 2).tolist()})
    (d / "gnd.json").write_text(json.dumps({"gnd": gnd}))
    return d, colours, gnd


def test_cli_show_grid_and_heatmap(cli_files):
    d, colours, gnd = cli_files
    grid_png, hm_png = str(d / "grid.png"), str(d / "hm.png")
    assert cli.main(["--quiet", "show", str(d / "res.npz"), "--images", str(d / "images.txt"), "--gnd",
                     str(d / "gnd.json"), "--topk", "4", "--max-queries", "5", "--grid", grid_png]) == 0
    res = np.load(d / "res.npz")
    pic = read_rgb(grid_png)
    # the CLI uses the default layout
    t, f, g, qg, cap = 128, 6, 6, 18, 28  # caption: two lines (name, rank and score)
    cell = t + 2 * f
    assert pic.shape[:2] == (g + 5 * (cap + cell + g), g + 5 * cell + 4 * g + qg + g)
    for q in range(5):
        y = g + q * (cap + cell + g) + cap
        np.testing.assert_allclose(pic[y + f + t // 2, g + f + t // 2], colours[res["ids"][q]], atol=2)
        for c in range(1, 5):
            x = g + c * (cell + g) + qg
            dbid = res["ranks"][q, c - 1]
            assert colour_name(pic[y + cell // 2, x + f // 2]) == expected_mark(dbid, gnd[q], "medium")
            np.testing.assert_allclose(pic[y + f + t // 2, x + f + t // 2], colours[dbid], atol=2)
    # the score matrix: heat map and a grid of its ranking (self matches are junk: yellow first column)
    assert cli.main(["--quiet", "show", str(d / "S.npy"), "--images", str(d / "images.txt"), "--gnd",
                     str(d / "gnd.json"), "--heatmap", hm_png, "--grid", grid_png, "--topk", "2"]) == 0
    S = np.load(d / "S.npy")
    assert mpimg.imread(hm_png).shape[:2] == (650, 800)
    pic = read_rgb(grid_png)
    assert pic.shape[:2] == (g + 8 * (cap + cell + g), g + 3 * cell + 2 * g + qg + g)
    for q in range(8):
        y = g + q * (cap + cell + g) + cap
        best = np.argsort(-S[q], kind="stable")[:2]
        for c, dbid in enumerate(best, start=1):
            x = g + c * (cell + g) + qg
            assert colour_name(pic[y + cell // 2, x + f // 2]) == expected_mark(dbid, gnd[q], "medium")
            np.testing.assert_allclose(pic[y + f + t // 2, x + f + t // 2], colours[dbid], atol=2)


def test_cli_show_errors(cli_files, capsys):
    d, _, gnd = cli_files
    (d / "short.json").write_text(json.dumps(gnd[:3]))
    (d / "bad.json").write_text("{not json")
    (d / "keep.png").write_text("not a picture")
    res, S, images = str(d / "res.npz"), str(d / "S.npy"), str(d / "images.txt")
    cases = [
        ["show", res, "--images", images],  # no output asked for
        ["show", res, "--grid", str(d / "g.png")],  # no --images
        ["show", res, "--heatmap", str(d / "h.png")],  # query results are not a score matrix
        ["show", res, "--images", images, "--gnd", str(d / "short.json"), "--grid", str(d / "g.png")],
        ["show", res, "--images", images, "--gnd", str(d / "bad.json"), "--grid", str(d / "g.png")],
        ["show", res, "--images", images, "--grid", str(d / "g.jpg")],
        ["show", res, "--images", images, "--grid", str(d / "keep.png")],
        ["show", res, "--images", images, "--grid", res],
        ["show", str(d / "missing.npz"), "--images", images, "--grid", str(d / "g.png")],
        ["show", S, "--images", str(d / "short.json"), "--heatmap", str(d / "h.png")],  # 1 line, 24 columns
        ["show", res, "--images", images, "--grid", str(d / "idx" / "g.png")],  # inside a checkpoint
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(["--quiet"] + argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("jasmk: error:") and "Traceback" not in err, (argv, err)
    assert (d / "keep.png").read_text() == "not a picture"
    assert not (d / "g.png").exists() and not (d / "h.png").exists()
