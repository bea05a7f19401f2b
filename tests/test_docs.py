"""The README and docs/ do not rot: their runnable examples run, every ``jasmk.*`` name they mention exists at
that path (not through a deprecated alias), their CLI lines parse, and their links lead somewhere."""

import importlib
import pathlib
import re
import shlex
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md"] + sorted((ROOT / "docs").glob("*.md"))
RUNS = re.compile(r"<!-- runs -->\n```python\n(.*?)```", re.S)


def page_id(path):
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("name", ["README.md", "docs/usage.md"])
def test_every_python_example_of_the_front_pages_is_run_by_this_test(name):
    text = (ROOT / name).read_text()
    assert text.count("```python") == len(RUNS.findall(text)) >= 1
    assert name != "README.md" or len(text.encode()) < 12_000  # a front door, not the manual


@pytest.mark.parametrize("page", [p for p in PAGES if RUNS.search(p.read_text())], ids=page_id)
def test_runnable_examples_run(page, tmp_path, monkeypatch):
    """A page's runnable examples run in order, in one namespace (a page may set up data first)."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for code in RUNS.findall(page.read_text()):
        exec(compile(code, str(page), "exec"), namespace)


def _resolve(dotted):
    """The object a dotted ``jasmk.a.b`` name denotes, importing modules as needed; raises if there is none."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_jasmk_name_a_page_mentions_exists_at_its_new_place(page):
    text = page.read_text()
    if page.name == "CHANGELOG.md":  # its table of moved paths names the old ones on purpose
        text = "\n".join(line for line in text.splitlines() if not line.startswith("|"))
    names = sorted(set(re.findall(r"\bjasmk(?:\.[A-Za-z_]\w*)+", text)))
    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in names:
            try:
                _resolve(name.rstrip("."))
            except (AttributeError, ImportError, DeprecationWarning) as exc:
                missing.append(f"{name}: {exc}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_cli_lines_parse(page):
    from jasmk import cli

    parser = cli.build_parser()
    lines = [m.split("#")[0].strip() for m in re.findall(r"^\s*(jasmk (?:codebook|index|query|score-matrix|pairs|"
                                                         r"show|--verbose|--quiet)\b.*)$", page.read_text(), re.M)]
    for line in lines:
        argv = shlex.split(line)[1:]
        if "..." in argv:
            continue
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page_id(page)}: {line!r} does not parse")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_lead_somewhere(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        assert (page.parent / target).exists(), f"{page_id(page)} links to {target}, which does not exist"
