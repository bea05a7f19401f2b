"""The house rules, read from the package's source (AST): layers import only downwards, no import circles, no
reaching into another module's underscore names, no jasmk imports inside functions (but in a deprecation
``__getattr__``), ``__all__`` in every module, and the engine free of file formats and heavy frameworks."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jasmk"

# what each layer may import from jasmk (its own layer included)
LAYERS = {
    "jasmk.core": {"jasmk.core"},
    "jasmk.storage": {"jasmk.core", "jasmk.storage"},
    "jasmk.head": {"jasmk.core", "jasmk.storage", "jasmk.head"},
    "jasmk.api": {"jasmk.core", "jasmk.storage"},
    "jasmk.logs": set(),
    "jasmk.shard": {"jasmk.core", "jasmk.storage", "jasmk.api", "jasmk.shard"},
}
HEAVY = {"torch", "flax", "orbax", "h5py", "matplotlib", "cv2"}  # never in the engine
# jasmk modules that import an optional heavy dependency at their top: imported inside a function, on use
LAZY = {"jasmk.core.numba_kernel"}


def modules(root=PACKAGE):
    """``{module name: source path}`` of every module under ``root`` (a package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _target(module, path, node):
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods):
    """Per module: ``(target module, imported name or None, enclosing function or None, line)`` for every import."""
    found = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        rows = []

        def visit(node, func):
            for child in ast.iter_child_nodes(node):
                inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
                if isinstance(child, ast.ImportFrom):
                    target = _target(name, path, child)
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        rows.append((sub if sub in mods else target, alias.name, func, child.lineno))
                elif isinstance(child, ast.Import):
                    rows.extend((alias.name, None, func, child.lineno) for alias in child.names)
                visit(child, inner)

        visit(tree, None)
        found[name] = (tree, rows)
    return found


def problems(root=PACKAGE):
    """Every broken rule, as readable lines."""
    mods = modules(root)
    found = imports(mods)
    out = []
    graph = {}
    for name, (tree, rows) in found.items():
        is_alias = "_JASMK_ALIAS" in mods[name].read_text()
        aliases = {}
        for target, imported, func, line in rows:
            top = target.split(".")[0]
            if name.startswith("jasmk.core") and top in HEAVY:
                out.append(f"{name}:{line} imports {target} (the engine imports no heavy framework)")
            if not target.startswith("jasmk"):
                continue
            if imported and imported.startswith("_") and imported != "__all__":
                out.append(f"{name}:{line} imports the private name {target}.{imported}")
            if func is not None and func != "__getattr__" and not is_alias and target not in LAZY:
                out.append(f"{name}:{line} imports {target} inside {func}()")
            layer = next((k for k in LAYERS if name == k or name.startswith(k + ".")), None)
            if layer is not None and func != "__getattr__" and target != "jasmk._moved":
                allowed = LAYERS[layer]
                if not any(target == a or target.startswith(a + ".") for a in allowed):
                    out.append(f"{name}:{line} ({layer}) imports {target}, a layer above or beside it")
            if func is None and target in mods and target != name:
                graph.setdefault(name, set()).add(target)
            if imported and target in mods:
                aliases[imported] = target
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and node.value.id in aliases:
                out.append(f"{name}:{node.lineno} reaches into {aliases[node.value.id]}.{node.attr}")
        if not is_alias and name != "jasmk.__main__" and not any(
                isinstance(n, (ast.Assign, ast.ImportFrom)) and "__all__" in ast.dump(n) for n in tree.body):
            out.append(f"{name} declares no __all__")
    # import circles among module-level imports (a package's __init__ re-exporting its modules is not one)
    state, stack = {}, []

    def dfs(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1 and not u.startswith(v + "."):
                out.append("import circle: " + " -> ".join(stack[stack.index(v):] + [v]))
            elif not state.get(v):
                dfs(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            dfs(m)
    return out


def test_the_package_keeps_its_house_rules():
    assert problems() == []


def test_the_rules_catch_what_they_forbid(tmp_path):
    pkg = tmp_path / "jasmk"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__all__ = []\n")
    (pkg / "core" / "__init__.py").write_text("__all__ = []\n")
    (pkg / "core" / "a.py").write_text(
        "import torch\nfrom .. import api\nfrom . import b\nfrom .b import _secret\n__all__ = []\n"
        "def f():\n    from . import b\n    return b._hidden\n")
    (pkg / "core" / "b.py").write_text("from . import a\n")
    (pkg / "api.py").write_text("__all__ = []\n")
    found = "\n".join(problems(pkg))
    for expected in ("imports torch", "imports jasmk.api, a layer above", "private name jasmk.core.b._secret",
                     "inside f()", "reaches into jasmk.core.b._hidden", "jasmk.core.b declares no __all__",
                     "import circle: jasmk.core.a -> jasmk.core.b -> jasmk.core.a"):
        assert expected in found, (expected, found)
