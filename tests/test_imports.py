"""The import graph of the project's packages, read from the source (function-level imports included): no
circles anywhere, top-level packages import only downward, pretrain's rooms and data's modules one way."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Bottom first: a package may import the ones before it, never one after it (model and data are independent).
PACKAGES = ["model", "data", "pretrain", "eval", "launch"]


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the packages (a package's __init__ under its own name)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported(name: str, file: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file: `import a.b`, `from a.b import c` (a.b, and
    a.b.c when that is a module), relative forms resolved against the module's package."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, f, set(mods)) for name, f in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_and_relative_imports():
    edges = graph()
    assert "pretrain.checkpoint.store" in edges["pretrain.checkpoint.resume"]  # from .store import (...)
    assert "data.tokenizer" in edges["pretrain.loop.train"]  # inside write_run_dir
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_anywhere():
    assert cycles(graph()) == []


def test_packages_import_only_downward():
    rank = {p: i for i, p in enumerate(PACKAGES)}
    upward = sorted(f"{a} imports {b}" for a, deps in graph().items() for b in deps
                    if rank[b.split(".")[0]] > rank[a.split(".")[0]])
    assert upward == []
    # model and data stand side by side at the bottom: neither imports the other.
    assert not [b for a, deps in graph().items() if a.split(".")[0] == "data" for b in deps if b.startswith("model")]


def test_pretrain_rooms_import_one_way():
    """loop -> engines -> checkpoint -> config; interop -> checkpoint; only __main__ imports the loop (and,
    outside pretrain, the launchers that run training)."""
    below = {"config": set(), "plot": set(), "checkpoint": {"config"},
             "engines": {"checkpoint", "config"}, "interop": {"checkpoint", "config"},
             "loop": {"engines", "checkpoint", "config", "plot"},
             "__main__": {"loop", "engines", "checkpoint", "config"}, "": set()}

    def room(name: str) -> str:  # pretrain.loop.train -> loop; pretrain.config -> config; pretrain -> ""
        return name.split(".")[1] if "." in name else ""

    edges = graph()
    wrong = sorted(f"{a} imports {b}" for a, deps in edges.items() if a.startswith("pretrain") for b in deps
                   if b.startswith("pretrain.") and room(b) != room(a) and room(b) not in below.get(room(a), set()))
    assert wrong == []
    loop_users = {a if a.startswith("pretrain") else a.split(".")[0] for a, deps in edges.items()
                  if not a.startswith("pretrain.loop") and any(b.startswith("pretrain.loop") for b in deps)}
    assert loop_users <= {"pretrain.__main__", "launch"}


def test_data_modules_import_one_way():
    """errors and dist at the bottom; the tokenizer imports neither the synthetic language nor the input
    readers; no module imports one above it (function-level imports included)."""
    layer = {"errors": 0, "dist": 0, "tokenizer": 1, "megatron": 1, "source": 1, "loader": 1, "inputs": 2,
             "shards": 2, "synthetic": 2, "blend": 2, "repeat": 3, "prepare": 3, "prepared": 4, "data": 5}
    edges = graph()
    for a in (m for m in edges if m.split(".")[0] == "data"):
        for b in (d for d in edges[a] if d.split(".")[0] == "data"):
            assert layer.get(b.split(".")[-1], 0) < layer.get(a.split(".")[-1], 99), f"{a} imports {b}"
    assert {d for d in edges["data.tokenizer"] if d.startswith("data")} == {"data.errors"}
