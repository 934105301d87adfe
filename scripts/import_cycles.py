"""Import cycles between natgrad's modules.

An edge A -> B for every ``from natgrad.X import y`` / ``import natgrad.X`` anywhere in A (module
level, inside functions, under TYPE_CHECKING); ``from P import m`` names the submodule ``P.m``
when it is one, and ``natgrad._C`` (the extension) is a module of its own. Prints every strongly
connected component of more than one module, with its two-module cycles, and their number.

Usage: python scripts/import_cycles.py python/
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def modules(root: Path) -> dict[str, Path | None]:
    """Every module under ``root`` by dotted name (packages by their ``__init__``)."""
    out: dict[str, Path | None] = {"natgrad._C": None}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def edges(mods: dict[str, Path | None]) -> dict[str, set[str]]:
    """The natgrad modules each module imports."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    out: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        if f is None:
            continue
        package = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                r = resolve(t)
                if r and r.startswith("natgrad") and r != m:
                    out[m].add(r)
    return out


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    """Prints the cycles; returns 1 if there is any."""
    graph = edges(modules(Path(sys.argv[1])))
    found = components(graph)
    for comp in found:
        print(len(comp), comp)
        for a in comp:
            for b in sorted(graph[a]):
                if b in comp and a in graph[b] and a < b:
                    print("   two-cycle:", a, "<->", b)
    print("cyclic components:", len(found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
