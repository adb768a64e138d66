"""The package's import graph: layers that only import downwards, no cycles, no imports hidden in functions.

Layers, lowest first: utils (and reference, the published numbers as data files), config, data, models,
distillers, engine, detection, then bench / reproduce / analysis, three rooms side by side that may use anything
below but not each other. The package's __init__ sits on top (it imports every component so that each registers
itself). The graph is read from the source with `ast`, so a violation is
found whether or not the import is ever executed: imports inside functions count too, and are reported as such.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mdistiller")
LAYERS = {"reference": 0, "utils": 0, "config": 1, "data": 2, "models": 3, "distillers": 4, "engine": 5,
          "detection": 6, "bench": 7, "reproduce": 7, "analysis": 7}
TOP = 8  # mdistiller/__init__.py, above every room


def modules():
    """{dotted module name: path} of every .py file in the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imported(module, path, is_package):
    """[(imported mdistiller module, line, inside a function)] of one file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("mdistiller"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.startswith("mdistiller"):
                    # `from .x import y` may import a submodule y: count it as the module it names when one exists
                    found.extend((f"{target}.{a.name}", child.lineno, in_function) for a in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def resolve(name, known):
    """The module a dotted import name refers to: itself, or its longest prefix that is a module."""
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


def layer(module):
    parts = module.split(".")
    return TOP if len(parts) == 1 else LAYERS[parts[1]]


def graph():
    known = modules()
    edges = {}
    for module, path in known.items():
        is_package = path.endswith("__init__.py")
        for name, line, in_function in imported(module, path, is_package):
            target = resolve(name, known)
            if target and target != module:
                edges.setdefault(module, []).append((target, line, in_function))
    return known, edges


def test_every_subpackage_has_a_layer():
    known, _ = graph()
    assert {m.split(".")[1] for m in known if m.count(".") >= 1} <= set(LAYERS)


def test_no_module_imports_a_higher_layer():
    known, edges = graph()
    upward = [f"{m} (layer {layer(m)}) line {line} imports {t} (layer {layer(t)})"
              for m, targets in edges.items() for t, line, _ in targets
              if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def room(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def sideways(edges):
    """Imports between two different rooms of one layer (bench, reproduce and analysis must not use each other)."""
    return [f"{m} line {line} imports {t} ({room(m)} and {room(t)} are both layer {layer(m)})"
            for m, targets in edges.items() for t, line, _ in targets
            if room(m) and room(t) and room(m) != room(t) and layer(m) == layer(t)]


def test_rooms_of_one_layer_do_not_import_each_other():
    _, edges = graph()
    found = sideways(edges)
    assert not found, "\n".join(found)


def test_a_sideways_import_would_be_found():
    """The check above on a made-up edge: reproduce using bench's internals is reported, within a room it is not."""
    edges = {"mdistiller.reproduce.plan": [("mdistiller.bench.variant", 12, False),
                                            ("mdistiller.reproduce.table", 13, False)]}
    assert sideways(edges) == ["mdistiller.reproduce.plan line 12 imports mdistiller.bench.variant (reproduce and "
                               "bench are both layer 7)"]


def test_no_imports_inside_functions():
    _, edges = graph()
    hidden = [f"{m} line {line}: {t}" for m, targets in edges.items() for t, line, inside in targets if inside]
    assert not hidden, "imports inside functions (dodging a cycle?):\n" + "\n".join(hidden)


def test_no_import_cycles():
    """Tarjan's strongly connected components over module-level imports; a package's __init__ importing its own
    submodules (and a submodule importing its package's other submodules) is how packages work, so edges from a
    package to its own children are left out."""
    known, edges = graph()
    adjacency = {m: sorted({t for t, _, inside in edges.get(m, []) if not inside and not t.startswith(m + ".")})
                 for m in known}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in adjacency[v]:
            if w not in index:
                strongconnect(w)
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
                cycles.append(sorted(component))

    for v in sorted(known):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walk_sees_a_known_edge_and_a_known_layer_order():
    """The checks above are only as good as the walk: it must find imports that do exist."""
    _, edges = graph()
    targets = {t for t, _, _ in edges["mdistiller.engine.classification"]}
    assert "mdistiller.distillers.plus_plus" in targets and "mdistiller.models.frozen" in targets
    assert layer("mdistiller.utils.errors") < layer("mdistiller.config.defaults") < layer("mdistiller.engine.trainer")
