"""Print which pipeline/ modules import which, at the top of the file or inside a function, and any cycles.

    python3 docs/import_graph.py              # text: one line per module, the own modules it imports
    python3 docs/import_graph.py --mermaid    # the same graph as a mermaid flowchart (docs/design.md)

Standard library only (``ast``): nothing is imported, so it runs without the project's virtualenv. An import
inside a function or method counts as "lazy" (drawn dashed); one under ``if TYPE_CHECKING:`` is left out, since
it never runs. A cycle is a strongly connected component of two or more modules (or a module importing itself);
cycles are reported twice: over top-level imports only (what Python's import machinery sees at start-up) and over
all imports (what the design must not have).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pipeline"


def module_name(path: Path) -> str:
    """Return the dotted module name of a file under ROOT (``pipeline/io/storage.py`` -> ``pipeline.io.storage``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> dict[str, str]:
    """Return {imported own module: "top" or "lazy"} for one file; "top" wins when a module is imported both ways."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, str] = {}

    def resolve(candidates: list[str], kind: str) -> None:
        for cand in candidates:
            while cand and cand not in modules:  # `pipeline.model.encoder.ExitHead` -> `pipeline.model.encoder`
                cand = cand.rpartition(".")[0]
            if cand and cand != name and not (cand == PACKAGE and name.startswith(PACKAGE + ".")):
                if found.get(cand) != "top":
                    found[cand] = kind

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit_stmt(sub, kind)
                continue
            visit_stmt(child, kind)

    def visit_stmt(child: ast.AST, kind: str) -> None:
        if isinstance(child, ast.Import):
            resolve([a.name for a in child.names], kind)
        elif isinstance(child, ast.ImportFrom):
            if child.level:  # relative: from . import x, from .io import y
                base = package.split(".")
                base = base[: len(base) - (child.level - 1)]
                mod = ".".join(base + ([child.module] if child.module else []))
            else:
                mod = child.module or ""
            resolve([f"{mod}.{a.name}" for a in child.names] + [mod], kind)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(child, "lazy")
        else:
            visit(child, kind)

    visit(ast.parse(path.read_text(), filename=str(path)), "top")
    return found


def cycles(graph: dict[str, dict[str, str]], kinds: set[str]) -> list[list[str]]:
    """Return the strongly connected components with a cycle, over the edges whose kind is in ``kinds`` (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, kind in graph[v].items():
            if kind not in kinds:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or graph[v].get(v) in kinds:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def short(name: str) -> str:
    return name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mermaid", action="store_true", help="print a mermaid flowchart instead of indented text")
    args = p.parse_args(argv)

    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imports_of(f, modules) for f in files}

    top_cycles = cycles(graph, {"top"})
    all_cycles = cycles(graph, {"top", "lazy"})
    n_top = sum(k == "top" for deps in graph.values() for k in deps.values())
    n_lazy = sum(k == "lazy" for deps in graph.values() for k in deps.values())

    if args.mermaid:
        print("flowchart LR")
        for mod in sorted(graph):
            for dep, kind in sorted(graph[mod].items()):
                arrow = "-->" if kind == "top" else "-.->"
                print(f"  {short(mod).replace('.', '_')}[{short(mod)}] {arrow} {short(dep).replace('.', '_')}[{short(dep)}]")
    else:
        print(f"{len(graph)} modules under {PACKAGE}/; module pairs linked by an import: {n_top} at the top of the "
              f"file, {n_lazy} only inside functions (lazy)")
        width = max(len(short(m)) for m in graph)
        for mod in sorted(graph):
            top = ", ".join(short(d) for d, k in sorted(graph[mod].items()) if k == "top") or "-"
            lazy = ", ".join(short(d) for d, k in sorted(graph[mod].items()) if k == "lazy")
            print(f"{short(mod):<{width}}  -> {top}" + (f"   lazy: {lazy}" if lazy else ""))
    comment = "%% " if args.mermaid else ""
    for label, found in (("top-level imports only", top_cycles), ("all imports, lazy included", all_cycles)):
        print(f"{comment}cycles over {label}: {len(found) or 'none'}")
        for comp in found:
            print(f"{comment}    " + " <-> ".join(short(m) for m in comp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
