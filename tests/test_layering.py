"""The package's layers, read from the source with ``ast`` (nothing is imported):

- no private name (``_x``) is imported from another module of ours: a helper two modules share is public;
- no import cycle among our modules: none through module-level imports, and none either when the imports
  inside function bodies count (those only hide a cycle); imports under ``if TYPE_CHECKING:`` never run;
- ``qcompiler.match`` reads graphs and never runs them: it imports nothing from ``qcompiler.runtime``
  (anywhere, function bodies included); the probe's measurements come in as data;
- the site and pair types are imported from the types-only ``qcompiler.sites``, not from the matcher.

``passes/`` is the package ``qcompiler.passes`` and ``runtime/`` is ``qcompiler.runtime``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"qcompiler": ROOT / "qcompiler", "qcompiler.passes": ROOT / "passes",
            "qcompiler.runtime": ROOT / "runtime"}

# Allowed for now, in files being rewritten by another hand; each list is to be emptied (an entry that no
# longer occurs fails the test, so that it is dropped).
# (file, module.private_name)
ALLOWED_PRIVATE: set[tuple[str, str]] = set()
# (importer, imported) edges, counting imports in function bodies, that close a cycle
ALLOWED_CYCLE_EDGES: set[tuple[str, str]] = set()
# (match module, runtime module): the deprecated ``match.analysis.analyze_graph`` that pipeline.py still calls
ALLOWED_MATCH_RUNTIME: set[tuple[str, str]] = set()
# (file, matcher module) that a type of qcompiler.sites is still imported from
ALLOWED_MATCH_TYPES: set[tuple[str, str]] = set()

TOP, FUNCTION, TYPING = "module level", "in a function", "type checking"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of ours."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(name: str) -> bool:
    return name == "qcompiler" or name.startswith("qcompiler.")


def _module_of(name: str) -> str | None:
    """The longest prefix of ``name`` that is one of our modules."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or \
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _imports(module: str):
    """(imported module, names or None, where, line) for every import of ours in ``module``; ``where`` is
    TOP, FUNCTION (inside a function body) or TYPING (under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))

    def walk(node: ast.AST, where: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, FUNCTION if where == TOP else where)
            elif isinstance(child, ast.If) and _type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), TYPING)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), where)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if _ours(alias.name):
                        yield alias.name, None, where, child.lineno
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, child)
                if _ours(target):
                    yield target, [a.name for a in child.names], where, child.lineno
            else:
                yield from walk(child, where)

    yield from walk(tree, TOP)


def _targets(target: str, names: list[str] | None) -> list[str]:
    """The modules an import statement loads: submodules named in ``from pkg import sub`` included."""
    found = []
    for name in names or [None]:
        sub = f"{target}.{name}" if name else None
        if sub in MODULES:
            found.append(sub)
        elif (mod := _module_of(target)) is not None:
            found.append(mod)
    return found


def test_the_module_list_is_read():
    assert {"qcompiler.graphio", "qcompiler.match.sites", "qcompiler.passes.base",
            "qcompiler.runtime.session"} <= set(MODULES)


def test_no_private_name_is_imported_from_another_module():
    found = set()
    for module in MODULES:
        for target, names, _, _ in _imports(module):
            for name in names or []:
                if name.startswith("_") and not name.startswith("__") and f"{target}.{name}" not in MODULES \
                        and _module_of(target) != module:
                    found.add((str(MODULES[module].relative_to(ROOT)), f"{target}.{name}"))
    assert found <= ALLOWED_PRIVATE, sorted(found - ALLOWED_PRIVATE)
    assert not ALLOWED_PRIVATE - found, f"fixed, drop from ALLOWED_PRIVATE: {sorted(ALLOWED_PRIVATE - found)}"


def _graph(kinds: tuple[str, ...]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, names, where, _ in _imports(module):
            if where in kinds:
                edges[module].update(t for t in _targets(target, names) if t != module)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert not _cycles(_graph((TOP,))), _cycles(_graph((TOP,)))


def test_no_import_cycle_hidden_in_function_bodies():
    edges = _graph((TOP, FUNCTION))
    for a, b in ALLOWED_CYCLE_EDGES:
        edges[a].discard(b)
    assert not _cycles(edges), _cycles(edges)


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_match_never_imports_runtime():
    found = set()
    for module in MODULES:
        if module == "qcompiler.match" or module.startswith("qcompiler.match."):
            for target, names, _, _ in _imports(module):
                for t in _targets(target, names):
                    if t == "qcompiler.runtime" or t.startswith("qcompiler.runtime."):
                        found.add((module, t))
    assert found <= ALLOWED_MATCH_RUNTIME, sorted(found - ALLOWED_MATCH_RUNTIME)
    assert not ALLOWED_MATCH_RUNTIME - found, f"fixed, drop: {sorted(ALLOWED_MATCH_RUNTIME - found)}"


def _site_types() -> set[str]:
    tree = ast.parse((ROOT / "qcompiler" / "sites.py").read_text(encoding="utf-8"))
    names = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    return names | {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


def test_site_types_come_from_the_types_module():
    types = _site_types()
    assert {"LinearSite", "CoupledPair", "ATTN_VO", "MLP_UP_DOWN", "SiblingGroup", "Analysis"} <= types
    found = set()
    for module in MODULES:
        if module.startswith("qcompiler.match"):
            continue
        for target, names, _, _ in _imports(module):
            if target.startswith("qcompiler.match") and set(names or ()) & types:
                found.add((str(MODULES[module].relative_to(ROOT)), target))
    assert found <= ALLOWED_MATCH_TYPES, sorted(found - ALLOWED_MATCH_TYPES)
    assert not ALLOWED_MATCH_TYPES - found, f"fixed, drop: {sorted(ALLOWED_MATCH_TYPES - found)}"
