"""The package's structure holds: no import cycle between loramix's modules, loramix's own modules imported
inside functions only where an optional dependency forces it, few top-level modules, and `import loramix`
does not pull in the trainer, evaluation or research tooling."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loramix"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(loramix modules imported at module level, those imported inside functions) of one file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, inner = set(), []
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    in_function = {id(n) for f in functions for n in ast.walk(f)}
    type_only = {id(n) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                 for n in ast.walk(n)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        found = {t for t in targets if t == "loramix" or t.startswith("loramix.")}
        if id(node) in in_function:
            inner += sorted(found)[:1]  # one entry per import statement
        else:
            top |= found
    return top, inner


def _graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph, inner = {}, {}
    for name, path in files.items():
        top, in_functions = _imports(path)
        graph[name] = {t if t in files else t.rpartition(".")[0] for t in top} - {name}
        inner[name] = in_functions
    return {n: {t for t in deps if t in files} for n, deps in graph.items()}, inner


def test_no_import_cycle():
    graph, _ = _graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_own_modules_are_imported_at_module_level():
    _, inner = _graph()
    found = {m: deps for m, deps in inner.items() if deps and not m.startswith("loramix.commands")}
    assert sum(len(d) for d in found.values()) <= 3, found


def test_few_top_level_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 10, modules


def test_import_loramix_leaves_out_the_trainer_evaluation_and_tools():
    code = ("import sys, loramix; print(sorted(m for m in sys.modules if m.startswith(("
            "'loramix.training.trainer', 'loramix.training.distributed', 'loramix.training.methods', "
            "'loramix.evaluation', 'loramix.tools', 'loramix.commands', 'loramix.data'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
