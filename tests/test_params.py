"""asmk's parameter files: ``jasmk.compat.load_params`` reads them as asmk 0.1.1's ``io_helpers.load_params`` does
(the oracle: asmk's own reader on the same files), ships HOW's sets by name, and a script ported from asmk runs
with them where asmk cannot be imported."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from jasmk.compat import load_params
from jasmk.storage import params as params_mod

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGED = ROOT / "jasmk" / "params"
HOW_SETS = ["eccv20_how_r18_1000", "eccv20_how_r50-_1000", "eccv20_how_r50-_2000"]


def _asmk_load_params():
    return pytest.importorskip("asmk.io_helpers").load_params


def test_the_packaged_sets_are_asmk_s_files():
    assert sorted(p.name for p in PACKAGED.glob("*.yml")) == ["_eccv20_how.yml"] + [f"{n}.yml" for n in HOW_SETS]
    assert params_mod.packaged_names() == HOW_SETS
    for name in HOW_SETS:
        assert "__template__: _eccv20_how.yml\n" in (PACKAGED / f"{name}.yml").read_text()


@pytest.mark.parametrize("name", HOW_SETS)
def test_every_packaged_set_equals_what_asmk_reads_from_the_same_files(name, tmp_path):
    asmk_load = _asmk_load_params()
    copies = tmp_path / "params"
    shutil.copytree(PACKAGED, copies)
    expected = asmk_load(str(copies / f"{name}.yml"))
    assert "__template__" not in expected
    assert load_params(name) == expected
    assert load_params(f"{name}.yml") == expected
    assert load_params(str(copies / f"{name}.yml")) == expected  # a path, the copy
    assert load_params(copies / f"{name}.yml") == expected  # an os.PathLike
    # the values HOW's table was made with (asmk's _eccv20_how.yml under the set's features)
    demo = expected["demo_how"]
    assert demo["eval_features"] == name.removeprefix("eccv20_")
    assert demo["codebook_features"] == ("how_r18_1000" if "r18" in name else "how_r50-_1000")
    assert expected["train_codebook"] == {"codebook": {"size": "64k"}}
    assert expected["build_ivf"]["kernel"] == {"binary": True} and expected["build_ivf"]["ivf"] == {"use_idf": False}
    assert expected["query_ivf"]["quantize"] == {"multiple_assignment": 5}
    assert expected["query_ivf"]["similarity"] == {"similarity_threshold": 0.0, "alpha": 3.0}


def test_a_template_chain_equals_asmk_s_reading(tmp_path, monkeypatch):
    asmk_load = _asmk_load_params()
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "root.yml").write_text(textwrap.dedent("""\
        # the bottom of the chain
        steps:
          build: {kernel: {binary: True}, quantize: {multiple_assignment: 1}}
          query: {similarity: {alpha: 3.0, similarity_threshold: 0.0}, datasets: [a, b, c]}
        only_in_root: 1
        replaced_by_scalar: {x: 1}
        """))
    (tmp_path / "base" / "mid.yml").write_text(textwrap.dedent("""\
        __template__: root.yml
        steps:
          query: {similarity: {alpha: 2.5}}
        only_in_mid: [m]
        """))
    top = tmp_path / "run.yaml"
    top.write_text(textwrap.dedent("""\
        __template__: base/mid.yml
        steps:
          build: {kernel: {binary: False}, new: {deep: {er: 1}}}
          query: {datasets: [z]}
        replaced_by_scalar: null
        only_in_mid: []
        """))
    expected = asmk_load(str(top))
    got = load_params(str(top))
    assert got == expected
    assert got == {
        "steps": {"build": {"kernel": {"binary": False}, "quantize": {"multiple_assignment": 1},
                            "new": {"deep": {"er": 1}}},
                  "query": {"similarity": {"alpha": 2.5, "similarity_threshold": 0.0}, "datasets": ["z"]}},
        "only_in_root": 1, "replaced_by_scalar": None, "only_in_mid": []}
    assert load_params(top) == expected
    # a template named from the home folder, as asmk expands it
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(tmp_path / "base" / "root.yml", home / "root.yml")
    (tmp_path / "from_home.yml").write_text("__template__: ~/root.yml\nonly_in_root: 2\n")
    monkeypatch.setenv("HOME", str(home))
    assert load_params(tmp_path / "from_home.yml") == asmk_load(str(tmp_path / "from_home.yml"))
    assert load_params(tmp_path / "from_home.yml")["only_in_root"] == 2


def test_errors_name_the_file_or_the_sets_there_are(tmp_path):
    with pytest.raises(ValueError, match=r"unknown asmk parameter set 'eccv20_how_r50_2000'.*eccv20_how_r18_1000, "
                                         r"eccv20_how_r50-_1000, eccv20_how_r50-_2000"):
        load_params("eccv20_how_r50_2000")
    with pytest.raises(ValueError, match="unknown asmk parameter set 'nope.yml'.*eccv20_how_r18_1000"):
        load_params("nope.yml")
    with pytest.raises(ValueError, match=r"not found: .*missing\.yml \(jasmk ships: eccv20_how_r18_1000"):
        load_params(str(tmp_path / "missing.yml"))
    with pytest.raises(ValueError, match="takes a path or a parameter set name"):
        load_params(None)

    (tmp_path / "orphan.yml").write_text("__template__: sub/gone.yml\na: 1\n")
    with pytest.raises(ValueError, match=r"orphan\.yml: its __template__ 'sub/gone.yml' is not a file"):
        load_params(tmp_path / "orphan.yml")
    (tmp_path / "a.yml").write_text("__template__: b.yml\nx: 1\n")
    (tmp_path / "b.yml").write_text("__template__: a.yml\ny: 1\n")
    with pytest.raises(ValueError, match=r"cycle: .*a\.yml -> .*b\.yml -> .*a\.yml"):
        load_params(tmp_path / "a.yml")
    (tmp_path / "self.yml").write_text("__template__: ./self.yml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_params(tmp_path / "self.yml")
    (tmp_path / "bad_template.yml").write_text("__template__: [x]\n")
    with pytest.raises(ValueError, match=r"bad_template\.yml: __template__ must be the path of a yaml file"):
        load_params(tmp_path / "bad_template.yml")

    for name, text, kind in (("list.yml", "- a\n- b\n", "list"), ("empty.yml", "", "NoneType"),
                             ("scalar.yml", "64k\n", "str")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name} is not an asmk parameter file: its yaml holds a {kind}"):
            load_params(tmp_path / name)
    (tmp_path / "broken.yml").write_text("a: [1, 2\nb: {\n")
    with pytest.raises(ValueError, match=r"broken\.yml is not valid yaml"):
        load_params(tmp_path / "broken.yml")
    (tmp_path / "uses_broken.yml").write_text("__template__: broken.yml\n")
    with pytest.raises(ValueError, match=r"broken\.yml is not valid yaml"):
        load_params(tmp_path / "uses_broken.yml")
    (tmp_path / "unsafe.yml").write_text("a: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ValueError, match=r"unsafe\.yml is not valid yaml"):  # safe_load only
        load_params(tmp_path / "unsafe.yml")


PORTED = textwrap.dedent(r"""
    import importlib.abc, sys

    class BlockAsmk(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "asmk" or name.startswith("asmk."):
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")

    sys.meta_path.insert(0, BlockAsmk())
    sys.path.insert(0, {root!r})
    try:
        import asmk  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("asmk was importable")

    import numpy as np
    from jasmk.compat import asmk_method, load_params

    params = load_params("eccv20_how_r18_1000")       # asmk: io_helpers.load_params("params/eccv20_how_r18_1000.yml")
    assert params["index"] == {{"gpu_id": 0}}         # no GPU for JAX here: faiss (or JAX) on the CPU
    params["train_codebook"]["codebook"]["size"] = 64  # 64k words would need millions of descriptors
    rng = np.random.default_rng(0)
    train = rng.standard_normal((3000, 128)).astype(np.float32)
    vecs = rng.standard_normal((20 * 40, 128)).astype(np.float32)
    imids = np.repeat(np.arange(20), 40)
    method = asmk_method.ASMKMethod.initialize_untrained(params)
    method = method.train_codebook(train)
    dataset = method.build_ivf(vecs, imids)
    qvecs, qimids = vecs[imids < 5], imids[imids < 5]
    metadata, images, ranks, scores = dataset.query_ivf(qvecs, qimids)
    assert list(images) == [0, 1, 2, 3, 4], images
    assert ranks.shape == (5, 20) and ranks.dtype == np.int64, (ranks.shape, ranks.dtype)
    assert scores.shape == (5, 20) and scores.dtype == np.float64, (scores.shape, scores.dtype)
    assert (ranks[:, 0] == np.arange(5)).all(), ranks[:, 0]   # each query image finds itself first
    assert not [m for m in sys.modules if m == "asmk" or m.startswith("asmk.")]
    print("PORTED OK", dataset.codebook.size)
""")


@pytest.mark.slow
def test_an_asmk_script_runs_with_asmk_blocked():
    out = subprocess.run([sys.executable, "-c", PORTED.format(root=str(ROOT))], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert "PORTED OK 64" in out.stdout


def test_reproduce_how_reads_the_packaged_sets():
    from helpers import load_experiment

    rh = load_experiment("reproduce_how")
    for name in HOW_SETS:
        setup = rh.resolve_params(name)
        assert setup == rh.resolve_params(str(PACKAGED / f"{name}.yml"))
        assert setup.params == rh.PARAMS and setup.eval_features == name.removeprefix("eccv20_")
    # --features FEATURES is --params eccv20_FEATURES: it gets past the parameter set to the missing data
    for features in ("how_r18_1000", "how_r50-_2000"):
        with pytest.raises(SystemExit, match="nothing to evaluate"):
            rh.main(["--features", features])
