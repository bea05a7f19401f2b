"""experiments/quickstart.ipynb runs top to bottom, its printed mAP matches a numpy AP of its own rankings, and the
file in git carries no outputs."""

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


@pytest.mark.slow
def test_notebook_runs_and_its_map_is_right(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # one extra cell (in memory only) hands the rankings and the ground truth back to the test
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json as _json\n"
        "print('@@' + _json.dumps({'ranks': np.asarray(ranks).tolist(), 'gnd': [{k: [int(i) for i in v] "
        "for k, v in g.items()} for g in gnd], 'n_db': int(index.n_images), 'db_scene': db_scene.tolist(), "
        "'q_scene': q_scene.tolist()}))"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
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
    # the pictures were shown (PNG outputs) and the jitted query agrees with score_matrix
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 2
    assert "agree: True" in "".join(text(c) for c in nb.cells if c.cell_type == "code")
