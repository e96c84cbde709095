#!/usr/bin/env python3
"""The package's import graph, read from the source with ast (nothing is imported): every module's
imports of other dowser_cli modules (top-level and function-local), the cycles among them, private
names imported across modules, and the largest modules and functions.

    python scripts/import_graph.py              # a summary
    python scripts/import_graph.py --edges      # plus every edge (module -> module, * = function-local)
    python scripts/import_graph.py --check      # exit 1 on a cycle or a private name imported across modules
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "dowser_cli"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(node: ast.ImportFrom, here: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_pkg else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(modules: dict[str, Path]):
    """edges[(a, b)] = "top" | "local"; private[(a, b, name)]; locals_count per module."""
    edges: dict[tuple[str, str], str] = {}
    private: list[tuple[str, str, str]] = []
    local_imports = 0
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        in_func = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            targets: list[tuple[str, list[str]]] = []
            if isinstance(node, ast.Import):
                targets = [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = resolve(node, name, is_pkg)
                names = [a.name for a in node.names]
                # `from dowser_cli import probe` imports a module, not a name
                subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
                targets = [(s, []) for s in subs] + ([(mod, [n for n in names if f"{mod}.{n}" not in modules])]
                                                     if len(subs) < len(names) else [])
            for target, names in targets:
                target = next((m for m in sorted(modules, key=len, reverse=True)
                               if target == m or target.startswith(m + ".")), None)
                if target is None or target == name:
                    continue
                local = id(node) in in_func
                local_imports += local
                kind = "local" if local else "top"
                if edges.get((name, target)) != "top":
                    edges[(name, target)] = kind
                private += [(name, target, n) for n in names if n.startswith("_") and not n.startswith("__")]
    return edges, private, local_imports


def cycles(nodes: list[str], edges: dict[tuple[str, str], str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {n: sorted(b for (a, b) in edges if a == n) for n in nodes}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return out


def sizes(modules: dict[str, Path]):
    mods, funcs = [], []
    for name, path in modules.items():
        text = path.read_text()
        mods.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(mods, reverse=True), sorted(funcs, reverse=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edges", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    modules = {module_name(p): p for p in sorted((ROOT / PKG).rglob("*.py"))}
    edges, private, local_imports = scan(modules)
    found = cycles(sorted(modules), edges)
    mods, funcs = sizes(modules)
    print(f"modules: {len(modules)}, import edges: {len(edges)} "
          f"({sum(k == 'local' for k in edges.values())} only function-local), "
          f"function-local imports of the package: {local_imports}")
    print(f"cycles: {len(found)}")
    for comp in found:
        print("  " + " <-> ".join(m.removeprefix(PKG + ".") for m in comp))
    print(f"private names imported across modules: {len(private)}")
    for a, b, n in private:
        print(f"  {a.removeprefix(PKG + '.')} imports {b.removeprefix(PKG + '.')}.{n}")
    print("largest modules (lines): " + ", ".join(f"{m.removeprefix(PKG + '.')} {n}" for n, m in mods[:5]))
    print("largest functions (lines): " + ", ".join(f"{f.removeprefix(PKG + '.')} {n}" for n, f in funcs[:5]))
    if args.edges:
        for (a, b), kind in sorted(edges.items()):
            print(f"  {a.removeprefix(PKG + '.')} -> {b.removeprefix(PKG + '.')}{' *' if kind == 'local' else ''}")
    return 1 if args.check and (found or private) else 0


if __name__ == "__main__":
    sys.exit(main())
