"""Shape of the hf_oto package, for before/after comparisons of a refactor (no third-party imports).

    python scripts/code_metrics.py [--root hf_oto] [--json OUT.json]

Prints: lines per package (non-blank, comments included), the longest functions, the parameter counts
of the public classes' constructors and public functions with the most parameters, the number of
``dict[str, Any]`` annotations, and the import graph between hf_oto's packages (edges and cycles).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections import defaultdict
from pathlib import Path


def package_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = rel.parts
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0] + (f".{parts[1]}" if parts[1] != "__init__" else "")


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def top_package(module: str) -> str:
    """hf_oto.export.save -> hf_oto.export; hf_oto.data -> hf_oto.data (a module at the top is its own node)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def collect(root: Path) -> dict:
    lines: dict[str, int] = defaultdict(int)
    functions: list[tuple[int, str]] = []
    ctor_params: list[tuple[int, str]] = []
    func_params: list[tuple[int, str]] = []
    any_dicts = 0
    edges: set[tuple[str, str]] = set()
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        mod = module_name(path, root)
        lines[top_package(mod)] += sum(1 for ln in text.splitlines() if ln.strip())
        any_dicts += len(re.findall(r"dict\[str, Any\]", text))
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                functions.append((n, f"{mod}.{node.name}"))
                args = node.args
                count = len(args.args) + len(args.kwonlyargs) + len(args.posonlyargs)
                if args.args and args.args[0].arg in ("self", "cls"):
                    count -= 1
                if not node.name.startswith("_") and node.col_offset == 0:
                    func_params.append((count, f"{mod}.{node.name}"))
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        a = item.args
                        ctor_params.append((len(a.args) + len(a.kwonlyargs) - 1, f"{mod}.{node.name}"))
                        break
                else:
                    fields = [i for i in node.body if isinstance(i, ast.AnnAssign)]
                    decorated = any("dataclass" in ast.unparse(d) for d in node.decorator_list)
                    if fields and decorated:
                        ctor_params.append((len(fields), f"{mod}.{node.name} (dataclass)"))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    if name.startswith("hf_oto.") and top_package(name) != top_package(mod):
                        edges.add((top_package(mod), top_package(name)))
    return {"lines": dict(sorted(lines.items())), "total_lines": sum(lines.values()),
            "longest_functions": sorted(functions, reverse=True)[:10],
            "constructor_params": sorted(ctor_params, reverse=True)[:10],
            "function_params": sorted(func_params, reverse=True)[:10],
            "dict_str_any": any_dicts, "import_edges": sorted(edges), "import_cycles": cycles(edges)}


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    graph: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        graph[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

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
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "hf_oto"))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    m = collect(Path(a.root).resolve())
    print(f"lines (non-blank): {m['total_lines']}")
    for pkg, n in m["lines"].items():
        print(f"  {pkg:24s} {n:6d}")
    print("longest functions:", ", ".join(f"{name} ({n})" for n, name in m["longest_functions"]))
    print("public constructors, most parameters:", ", ".join(f"{name} ({n})" for n, name in m["constructor_params"]))
    print("public functions, most parameters:", ", ".join(f"{name} ({n})" for n, name in m["function_params"]))
    print(f"dict[str, Any]: {m['dict_str_any']}")
    print(f"import edges between packages: {len(m['import_edges'])}; cycles: {m['import_cycles'] or 'none'}")
    if a.json:
        Path(a.json).write_text(json.dumps(m, indent=1) + "\n")


if __name__ == "__main__":
    main()
