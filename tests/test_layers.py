"""The package's layers only look down: no import (eager or lazy) from a module to one of a later
layer, and no import cycle among the modules. Read from the source with ast (nothing imported).

The layers, as the data flow (docs/layout.md):

0 foundation   errors, fileio, random, parallel, workers, logs, figures, versions
1 data set     skymaps, catalog, datasets/ (tables, images), preprocessing, sources, simulation/
2 model        model/
3 inference    inference/
3.5 run        run/ (RunFolder: the only code that names, reads and writes a run's files)
4 products     products/
5 recipes      pipeline
6 front        cli_options, cli, __main__ (and the package's own ``__init__``, which is not judged)
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "galdecomp")
LAYER = {"errors": 0, "fileio": 0, "seeds": 0, "parallel": 0, "workers": 0, "logs": 0, "figures": 0,
         "versions": 0,
         "skymaps": 1, "catalog": 1, "sources": 1, "datasets": 1, "preprocessing": 1, "simulation": 1,
         "model": 2, "inference": 3, "run": 3.5, "products": 4, "pipeline": 5, "cli_options": 6, "cli": 6, "__main__": 6}


def modules():
    """Module name (``galdecomp.x.y``) -> path, for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports(name, path, known):
    """The package's modules that ``name`` imports anywhere in its source (functions included)."""
    found = set()
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {target} | {f"{target}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m not in (name, "galdecomp")}


def layer(name):
    return LAYER[name.split(".")[1]]


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if m != "galdecomp" and m.split(".")[1] not in LAYER)
    assert not unplaced, f"modules without a layer (add them to LAYER): {unplaced}"


def test_no_module_imports_from_a_later_layer():
    upward = sorted(f"{a} -> {b}" for a, targets in graph().items() if a != "galdecomp"
                    for b in targets if layer(b) > layer(a))
    assert not upward, "imports from a later layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path):
    """The reading of imports finds what it must (a relative lazy import inside a function)."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from ..products import report\n    from . import conditional\n")
    known = {"galdecomp.products.report", "galdecomp.products", "galdecomp.inference.conditional"}
    assert imports("galdecomp.inference.mod", str(path), known) == {"galdecomp.products.report",
                                                                   "galdecomp.products",
                                                                   "galdecomp.inference.conditional"}
