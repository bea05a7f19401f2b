"""experiments/quickstart.ipynb runs top to bottom, reads as a tutorial (jasmk.query, save/load and the command line
before the jitted query_padded), its ranks agree with its score matrix and the command line's, its printed mAP
matches a numpy AP of its own rankings, and the file in git carries no outputs."""

import json
import os
import pathlib
import re

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "quickstart.ipynb"


def numpy_ap(ranking, positives, junk):
    """Trapezoid AP with junk images removed from the ranking first (revisited protocol)."""
    ranking = [x for x in ranking if x not in junk]
    pos = [r for r, x in enumerate(ranking) if x in positives]
    return sum(((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / 2 / len(positives) for j, r in enumerate(pos))


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 5
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


# the tutorial's sections, in this order, and what the first code cell after each heading calls
SECTIONS = [("## Codebook", "Codebook and index", ["jasmk.train_codebook(", "jasmk.build_index("]),
            ("## Query", "Query", ["jasmk.query(index, "]),
            ("## Save and load", "Save and load", ["jasmk.save_index(", "jasmk.save_codebook(", "jasmk.load_index("]),
            ("## The command line", "The command line", ['"-m", "jasmk", "query"', "subprocess.run("]),
            ("## A jitted query", "A jitted query", ["jasmk.query_padded"]),
            ("## Evaluation", "Evaluation", ["jeval.evaluate_revisited("]),
            ("## Pictures", "Pictures", ["show.results_grid("])]


def test_notebook_sections_come_in_tutorial_order():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    headings = [(i, line) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
                for line in c.source.splitlines() if line.startswith("## ")]
    where = []
    for title, _, calls in SECTIONS:
        found = [i for i, line in headings if line.startswith(title)]
        assert len(found) == 1, (title, headings)
        where.append(found[0])
        code = next(c.source for c in nb.cells[found[0]:] if c.cell_type == "code")
        assert all(call in code for call in calls), (title, calls, code[:200])
    assert where == sorted(where), headings
    # the simple API comes before the jitted one in the code too, and the intro lists the sections in this order
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert code.index("jasmk.query(") < code.index("jasmk.save_index(") < code.index('"-m", "jasmk"') \
        < code.index("jasmk.query_padded")
    listed = [nb.cells[0].source.index(f"**{name}**") for _, name, _ in SECTIONS]
    assert listed == sorted(listed), nb.cells[0].source


@pytest.mark.slow
def test_notebook_runs_and_its_map_is_right(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # one extra cell (in memory only) hands the rankings (query_padded's, jasmk.query's, the command line's), the
    # score matrix and the ground truth back to the test
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json as _json\n"
        "print('@@' + _json.dumps({'ranks': np.asarray(ranks).tolist(), 'gnd': [{k: [int(i) for i in v] "
        "for k, v in g.items()} for g in gnd], 'n_db': int(index.n_images), 'db_scene': db_scene.tolist(), "
        "'q_scene': q_scene.tolist(), 'q_ids': result.ids.tolist(), 'q_ranks': result.ranks.tolist(), "
        "'q_scores': result.scores.tolist(), 'cli_ids': cli_ids.tolist(), 'cli_ranks': cli_ranks.tolist(), "
        "'cli_scores': cli_scores.tolist(), 'S': np.asarray(S).tolist()}))"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg", JASMK_XLA_CACHE="0")
    old = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors

    def text(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    dump = json.loads(text(nb.cells[-1]).split("@@", 1)[1])
    ranks, gnd = np.array(dump["ranks"]), dump["gnd"]
    key = [c for c in nb.cells if "map" in c.metadata.get("tags", [])]
    assert len(key) == 1
    printed = text(key[0])
    medium = float(re.search(r"^medium mAP\s+([0-9.]+)", printed, re.M).group(1))
    vmapped = float(re.search(r"^medium mAP ([0-9.]+)$", printed, re.M).group(1))
    easy = float(re.search(r"^easy\s+mAP\s+([0-9.]+)", printed, re.M).group(1))
    chance = float(re.search(r"random ranking: medium mAP ([0-9.]+)", printed).group(1))

    # the rankings are permutations of the database, and the ground truth is the query's scene
    assert ranks.shape == (len(gnd), dump["n_db"])
    assert all(sorted(r) == list(range(dump["n_db"])) for r in ranks.tolist())
    db_scene, q_scene = np.array(dump["db_scene"]), np.array(dump["q_scene"])
    for g, s in zip(gnd, q_scene):
        assert sorted(g["easy"] + g["hard"]) == np.flatnonzero(db_scene == s).tolist()
        assert all(db_scene[j] != s for j in g["junk"])
    want = 100 * np.mean([numpy_ap(list(r), set(g["easy"] + g["hard"]), set(g["junk"])) for r, g in zip(ranks, gnd)])
    assert medium == pytest.approx(want, abs=0.01) and vmapped == pytest.approx(want, abs=0.01)
    want_easy = 100 * np.mean([numpy_ap(list(r), set(g["easy"]), set(g["junk"] + g["hard"]))
                               for r, g in zip(ranks, gnd)])
    assert easy == pytest.approx(want_easy, abs=0.01)
    assert chance < 30 and medium > chance + 40  # sane: retrieval works, far above a random ranking

    # jasmk.query, the command line on the saved index and the score matrix tell the same story
    q_ranks, q_scores, S = np.array(dump["q_ranks"]), np.array(dump["q_scores"]), np.array(dump["S"])
    n_q, k = len(gnd), 10
    assert dump["q_ids"] == dump["cli_ids"] == list(range(n_q))
    assert q_ranks.shape == (n_q, k) and S.shape == (n_q, dump["n_db"])
    assert np.array_equal(np.array(dump["cli_ranks"]), q_ranks)
    np.testing.assert_allclose(np.array(dump["cli_scores"]), q_scores, rtol=1e-6, atol=1e-9)
    want = np.argsort(-S, axis=1, kind="stable")[:, :k]
    for q in range(n_q):
        assert len(set(q_ranks[q].tolist())) == k
        np.testing.assert_allclose(q_scores[q], S[q, q_ranks[q]], rtol=1e-5, atol=1e-9)
        for a, b in zip(q_ranks[q], want[q]):  # the best k of the matrix, in order; only exact ties may swap
            assert a == b or S[q, a] == S[q, b], (q, q_ranks[q], want[q], S[q, q_ranks[q]], S[q, want[q]])
    # the pictures were shown (PNG outputs) and the jitted query agrees with score_matrix
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 2
    assert "agree: True" in "".join(text(c) for c in nb.cells if c.cell_type == "code")
