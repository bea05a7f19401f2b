"""Quiet by default: the CLI and the synthetic demo, run as a user runs them (a fresh process, JAX left to pick its
platform), print no INFO lines from jasmk, faiss, JAX or Orbax on stderr; ``--verbose`` brings jasmk's back."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# what the libraries print at INFO when nobody turns them down (seen before the fix)
NOISE = [r"\bINFO\b", r"Loading faiss", r"Successfully loaded faiss", r"swigfaiss", r"Unable to initialize backend",
         r"\[process=\d+\]", r"orbax", r"Orbax", r"Checkpoint", r"checkpoint", r"TensorStore", r"Metadata"]
PROGRESS = re.compile(r"^[\w ]+:\s+\d+%\|")  # a tqdm bar: "query:  40%|####      | 12/30 [...]"


def _run(args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORM", "TF_CPP"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def _lines(stderr):
    """stderr split into lines (and progress-bar redraws), bars dropped."""
    parts = (p.strip() for p in re.split(r"[\r\n]+", stderr))
    return [p for p in parts if p and not PROGRESS.match(p)]


def _noise(lines, own=None):
    """The lines that look like library INFO chatter (``own``: the program's own message prefix, allowed)."""
    return [line for line in lines if not (own and line.startswith(own))
            and any(re.search(pattern, line) for pattern in NOISE)]


@pytest.mark.slow
def test_cli_is_quiet_by_default_and_verbose_on_request(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1600, 16)).astype(np.float32)
    ids = np.repeat(np.arange(16), 100)
    np.save(tmp_path / "train.npy", feats)
    np.savez(tmp_path / "db.npz", feats=feats, ids=ids)
    cli = ["-m", "jasmk"]
    quiet_runs = [
        cli + ["codebook", "train.npy", "--size", "32", "--out", "cb"],  # 1600 >= 39 * 32: no faiss warning
        cli + ["index", "db.npz", "--codebook", "cb", "--out", "idx"],
        cli + ["query", "idx", "db.npz", "--topk", "5", "--out", "res.npz"],
    ]
    wrote = {"codebook": r"^jasmk: wrote cb \(codebook: 32 words, 16-d, trained on 1600 descriptors\)$",
             "index": r"^jasmk: wrote idx \(index: 16 images, \d+ postings, 32 words, ASMK\*\)$",
             "query": r"^jasmk: wrote res.npz \(ranks of 16 queries, top 5 of 16 images\)$"}
    for args in quiet_runs:
        proc = _run(args, tmp_path)
        # stderr is a pipe here, as in a log file: whole lines only, no bar redraws glued to the next message
        assert "\r" not in proc.stderr and proc.stderr.endswith("\n"), repr(proc.stderr)
        lines = proc.stderr.splitlines()
        assert _noise(lines) == [], (args, proc.stderr)
        own = [line for line in lines if not re.match(r"^jasmk: [\w ,-]+: \d+/\d+ \w+ (\(\d+ %\)|in [\d.]+ s)$", line)]
        assert len(own) == 1 and re.match(wrote[args[2]], own[0]), proc.stderr  # one summary line, no INFO
    res = np.load(tmp_path / "res.npz")
    assert res["ranks"].shape == (16, 5)

    proc = _run(cli + ["--verbose", "score-matrix", "idx", "db.npz", "--out", "S.npy"], tmp_path)
    lines = _lines(proc.stderr)
    assert "jasmk: wrote S.npy (scores of 16 queries x 16 images)" in lines, proc.stderr
    assert _noise(lines, own="jasmk:") == [], proc.stderr  # the libraries stay quiet with --verbose too
    proc = _run(cli + ["--quiet", "score-matrix", "idx", "db.npz", "--out", "S2.npy"], tmp_path)
    assert proc.stderr.strip() == ""  # --quiet: no progress, no summary
    np.testing.assert_array_equal(np.load(tmp_path / "S.npy"), np.load(tmp_path / "S2.npy"))


@pytest.mark.slow
def test_synthetic_demo_is_quiet(tmp_path):
    args = [str(ROOT / "experiments" / "demo_synthetic.py"), "--images", "16", "--per-image", "80",
            "--codebook", "32"]
    proc = _run(args, tmp_path)
    assert "mAP" in proc.stdout
    assert _noise(_lines(proc.stderr)) == [], proc.stderr
    assert not any(line.startswith("demo_synthetic:") for line in _lines(proc.stderr)), proc.stderr
    proc = _run(args + ["--verbose"], tmp_path)
    lines = _lines(proc.stderr)
    assert any(line.startswith("demo_synthetic: training codebook: 32 words") for line in lines), proc.stderr
    assert _noise(lines, own="demo_synthetic:") == [], proc.stderr


@pytest.mark.slow
def test_the_readmes_demo_command_prints_no_warning(tmp_path):
    """The README's first command as written: its codebook fits its data, so neither faiss ("please provide at
    least ... training points") nor jasmk has anything to warn about."""
    proc = _run([str(ROOT / "experiments" / "demo_synthetic.py")], tmp_path)
    assert "mAP" in proc.stdout
    assert not re.search(r"(?i)warn|please provide|per word", proc.stderr), proc.stderr
    assert not any(line.startswith("demo_synthetic:") for line in proc.stderr.splitlines()), proc.stderr
