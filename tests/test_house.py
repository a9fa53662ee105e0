"""The house rules the layout promises, checked on the source: no import cycles, imports one way, public APIs only.

Read with `ast`, lazy imports (inside functions and under TYPE_CHECKING) included, since a cycle through a
lazy import still ties two modules together.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pseudotrack"

# Which folder may import which: cli -> flows -> tasks -> teachers / storage; the dashboard only reads.
FLOORS = {
    "cli": 5,
    "dashboard": 4,
    "flows": 4,
    "student": 3,
    "tasks": 2,
    "teachers": 1,
    "storage": 1,
}
# Other libraries whose private names break on their next minor release.
WATCHED = ("prefect", "botocore", "boto3", "webdataset", "decord", "av")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def package_imports(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its body."""
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, tree in mods.items():
        is_package = (PACKAGE.parent / (name.replace(".", "/") + "/__init__.py")).exists()
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(name, is_package, node)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target.startswith("pseudotrack") and target != name and target != "pseudotrack":
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 2 else None


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(package_imports(modules())) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"pseudotrack.a.x": {"pseudotrack.a.y"}, "pseudotrack.a.y": {"pseudotrack.a.x"}, "pseudotrack.b": set()}
    assert cycles(graph) == [["pseudotrack.a.x", "pseudotrack.a.y"]]


def test_imports_run_one_way() -> None:
    """A folder never imports one on a higher floor (cli -> flows -> tasks -> teachers / storage)."""
    upward = []
    for name, targets in package_imports(modules()).items():
        here = floor_of(name)
        for target in targets:
            there = floor_of(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{name} -> {target}")
    assert upward == []


def private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))


def private_uses(tree: ast.Module) -> list[str]:
    """Private names of the watched libraries: imported, reached as attributes, or overridden in a subclass."""
    bound: dict[str, str] = {}  # local name -> the library's dotted name it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in WATCHED:
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
                    if private(alias.name):
                        found.append(alias.name)
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in WATCHED:
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                bound[alias.asname or alias.name] = dotted
                if private(dotted):
                    found.append(dotted)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = [node.attr]
            value = node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                dotted = ".".join([bound[value.id], *reversed(chain)])
                if private(dotted):
                    found.append(dotted)
            # private attributes of a botocore/boto3 client or session, whatever variable holds it
            if node.attr in ("_endpoint", "_session", "_client_config", "_request_signer"):
                found.append(f"<object>.{node.attr}")
        elif isinstance(node, ast.ClassDef):
            bases = [ast.unparse(base).split(".")[0] for base in node.bases]
            if any(base in bound for base in bases):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and private(item.name):
                        found.append(f"{node.name}.{item.name} overrides a library's private method")
    return sorted(set(found))


def test_no_private_names_of_other_libraries() -> None:
    found = {name: uses for name, tree in modules().items() if (uses := private_uses(tree))}
    assert found == {}


def test_tests_and_benches_use_no_private_names_either() -> None:
    """The rule holds for the code that checks and measures the package too: it breaks on the same upgrades."""
    root = PACKAGE.parent
    found = {
        str(p.relative_to(root)): uses
        for folder in ("tests", "bench")
        for p in sorted((root / folder).rglob("*.py"))
        if (uses := private_uses(ast.parse(p.read_text(), str(p))))
    }
    assert found == {}


def test_the_private_name_finder_finds_them() -> None:
    source = (
        "import prefect.flow_engine as engine\n"
        "from prefect.workers.process import ProcessWorker\n"
        "engine._send_heartbeats = None\n"
        "client._endpoint.http_session\n"
        "class Warm(ProcessWorker):\n"
        "    def _submit_run_and_capture_errors(self): ...\n"
        "    def submit(self): ...\n"
    )
    assert private_uses(ast.parse(source)) == [
        "<object>._endpoint",
        "Warm._submit_run_and_capture_errors overrides a library's private method",
        "prefect.flow_engine._send_heartbeats",
    ]


def test_the_package_names_no_mock() -> None:
    """Nothing in the package is tuned to (or even names) the moto mock: S3 is measured against SeaweedFS."""
    named = [
        f"{p.relative_to(PACKAGE.parent)}:{i}"
        for p in PACKAGE.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\bmoto\b", line, re.IGNORECASE)
    ]
    assert named == []
