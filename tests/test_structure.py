"""The package's shape (issue 9): imports point one way (no cycle between
its modules, counting imports inside functions too), no file over 450
lines, no function over 60.

Checked for every module of the package."""

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "keras_tensor_parallel"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
CHECKED = sorted(MODULES)


def _imported(name: str, path: pathlib.Path) -> set[str]:
    """Package modules `name` imports (a submodule importing its own parent
    package is how Python loads it, not a dependency)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[
                    : len(package.split(".")) - node.level + 1
                ]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in MODULES else base)
    out = set()
    for target in found:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(target + "."):
            out.add(target)
    return out


def _cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = {m: _imported(m, p) for m, p in MODULES.items()}
    cycles = [c for c in _cycles(graph) if set(c) & set(CHECKED)]
    assert cycles == []


def test_catalogue_and_verify_import_nothing_above_them():
    # The catalogue is a leaf; verify and comms sit below the training run
    # and the CLI.
    graph = {m: _imported(m, p) for m, p in MODULES.items()}
    pkg = "keras_tensor_parallel."
    for name in CHECKED:
        deps = graph[name]
        if ".catalogue" in name:
            assert all(d.startswith(pkg + "catalogue") for d in deps), deps
        if ".verify" in name or ".comms" in name:
            top = {pkg + "cli", pkg + "training"}
            assert not deps & top, (name, deps)


def test_the_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [
        ["a", "b", "c"]
    ]


@pytest.mark.parametrize("name", CHECKED)
def test_file_and_function_sizes(name):
    text = MODULES[name].read_text()
    assert text.count("\n") <= 450, f"{name}: {text.count(chr(10))} lines"
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == [], name
