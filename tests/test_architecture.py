"""The house's import rules (docs/architecture.md), checked on the source: no install, nothing imported.

Every ``import`` counts, also one inside a function or under ``TYPE_CHECKING``: a rule broken lazily is
broken all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Where each import name lives (pacsbridge/shared etc. are links to these folders).
FOLDERS = {
    "pacsbridge.shared": ROOT / "shared",
    "pacsbridge.listener": ROOT / "services" / "listener",
    "pacsbridge.worker": ROOT / "services" / "worker",
    "pacsbridge.api": ROOT / "services" / "api",
    "pacsbridge": ROOT / "pacsbridge",
}

#: The layers of ``shared/``, and what each may import (besides itself).
SHARED_LAYERS = {
    "core": set(),
    "dicom": {"core"},
    "index": {"core", "dicom"},
    "deid": {"core", "dicom"},
    "jobs": {"core", "dicom", "index", "deid"},
    "nodes": {"core", "dicom", "index", "deid"},
    # cohorts (issue 17): the rows read the query's and the projects' patterns; the store and the
    # mass transfer build on jobs and nodes
    "cohorts": {"core", "dicom", "index", "deid", "jobs", "nodes"},
}
SERVICES = ("pacsbridge.listener", "pacsbridge.worker", "pacsbridge.api")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if package == "pacsbridge" and path.parent != folder:
                continue  # pacsbridge/shared and the others: read once, under their own folder
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The pacsbridge modules ``name`` imports (a package import counts as its ``__init__``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from package import module" imports that module
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target.startswith("pacsbridge") and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if module.startswith("pacsbridge.shared.") and len(parts) > 2 else None


def test_the_tree_is_read():
    """The rules below look at something: every layer and service has modules, with imports."""
    layers = {_layer(m) for m in MODULES}
    assert set(SHARED_LAYERS) <= layers
    for service in SERVICES:
        assert any(m.startswith(service + ".") for m in MODULES), service
    assert "pacsbridge.worker.kinds.retrieve" in MODULES
    assert "pacsbridge.shared.nodes.sources" in GRAPH["pacsbridge.worker.kinds.retrieve"]
    assert GRAPH["pacsbridge"] == set()


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("pacsbridge.shared")))
def test_shared_imports_only_lower_layers_and_never_a_service(module):
    layer = _layer(module)
    allowed = SHARED_LAYERS.get(layer, set()) | ({layer} if layer else set()) if layer else set(SHARED_LAYERS)
    for target in sorted(GRAPH[module]):
        assert target.startswith("pacsbridge.shared"), f"{module} imports {target}: shared/ imports no service"
        target_layer = _layer(target)
        if target_layer is None:  # the package pacsbridge.shared itself
            continue
        assert target_layer in allowed, (
            f"{module} ({layer}) imports {target} ({target_layer}); {layer} may import {sorted(allowed)}")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(SERVICES)))
def test_services_import_shared_never_each_other(module):
    own = next(s for s in SERVICES if module.startswith(s))
    for target in sorted(GRAPH[module]):
        # "pacsbridge" alone is the root package's __init__ (its __version__), which imports nothing
        assert target == "pacsbridge" or target.startswith(("pacsbridge.shared", own)), (
            f"{module} imports {target}: a service imports pacsbridge.shared and itself only")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    # a package's __init__ importing its own modules is how a package hands names on, not a cycle
    graph = {m: {t for t in ts if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")}
             for m, ts in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_job_kinds_are_registered_not_loaded_by_name():
    # (the listener's PACSBRIDGE_AFTER_STORE names a user's own callback: that one is loaded by name)
    for name, path in MODULES.items():
        if not name.startswith("pacsbridge.worker"):
            continue
        text = path.read_text(encoding="utf-8")
        assert "import_module(" not in text and "__import__(" not in text, path


# -- docs/architecture.md draws the house that is built ---------------------------------------------------
DOC = ROOT / "docs" / "architecture.md"


def _package(module: str) -> str:
    """The package a module belongs to, as docs/architecture.md's picture names it."""
    layer = _layer(module)
    if layer:
        return f"shared/{layer}"
    for service in SERVICES:
        if module == service or module.startswith(service + "."):
            return service.rpartition(".")[2]
    return "pacsbridge"


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module == "pacsbridge.shared":
            continue  # the package's face: its docstring, no import
        source = _package(module)
        out.setdefault(source, set())
        # the API's `from pacsbridge import __version__` is the root package's face, not a layer
        out[source] |= {_package(t) for t in targets if t not in ("pacsbridge", "pacsbridge.shared")} - {source}
    return out


def _drawn_graph(text: str) -> dict[str, set[str]]:
    block = text.split("The import graph between packages today", 1)[1].split("```", 2)[1]
    drawn: dict[str, set[str]] = {}
    for line in block.strip().splitlines():
        source, _, targets = line.partition("──▶")
        names = {t.strip() for t in targets.split(",")} - {"(nothing of pacsbridge)"}
        drawn[source.strip()] = names
    return drawn


def _layer_table(text: str) -> dict[str, set[str]]:
    table = text.split("## The layers of `shared/`", 1)[1].split("The services:", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`shared/"):
            may = set() if cells[2] == "nothing of pacsbridge" else {c.strip(" `") for c in cells[2].split(",")}
            rows[cells[0].strip("`").removeprefix("shared/")] = may
    return rows


def test_the_architecture_page_draws_the_import_graph_of_the_code():
    drawn = _drawn_graph(DOC.read_text(encoding="utf-8"))
    assert drawn == _package_graph(GRAPH)


def test_the_architecture_page_says_what_each_layer_may_import():
    assert _layer_table(DOC.read_text(encoding="utf-8")) == SHARED_LAYERS


def test_the_page_checks_see_a_difference():
    text = DOC.read_text(encoding="utf-8")
    graph = {m: set(ts) for m, ts in GRAPH.items()}
    graph["pacsbridge.shared.core.db"].add("pacsbridge.shared.index.storage")  # a new arrow, not drawn
    assert _drawn_graph(text) != _package_graph(graph)
    assert _layer_table(text.replace("| `core`, `dicom` |", "| `core` |", 1)) != SHARED_LAYERS

#: What a fresh clone lacks before any install: the package itself and what it depends on.
NOT_INSTALLED = ("pacsbridge", "sqlalchemy", "alembic", "pydicom", "pynetdicom", "pydantic", "pydantic_settings",
                 "celery", "flask", "psycopg2", "prometheus_client", "rich", "requests")


def test_this_file_runs_with_pytest_alone():
    """A fresh clone, before any install (issue 15): pytest alone runs the import rules. Here the package and
    its dependencies are made unimportable and pytest's plugins left unloaded (no pytest-timeout, whose
    `timeout` option pyproject.toml sets), so tests/conftest.py may import none of them at its top."""
    import os
    import subprocess
    import sys

    code = ("import sys\n"
            f"for name in {NOT_INSTALLED!r}:\n"
            "    sys.modules[name] = None  # import name -> ImportError\n"
            "import pytest\n"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'not pytest_alone', "
            "'tests/test_architecture.py']))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "error" not in proc.stdout.lower()
