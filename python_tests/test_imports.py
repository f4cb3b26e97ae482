"""The import graph of fwpkm_ext: read from the sources with ``ast`` (imports at module level and
inside functions), it has no cycle; and every public module imports on its own, in a fresh
process (no module works only because another one was imported first)."""
import ast
import json
import os
import subprocess
import sys

import fwpkm_ext

PKG = "fwpkm_ext"
PKG_DIR = os.path.dirname(os.path.abspath(fwpkm_ext.__file__))


def _modules():
    """{module name: (path, is a package)} for every .py file of the package, and the compiled
    extensions (path None: they import nothing of the package)."""
    out = {}
    for root, dirs, files in os.walk(PKG_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__" and os.path.isfile(os.path.join(root, d, "__init__.py"))]
        rel = os.path.relpath(root, os.path.dirname(PKG_DIR)).replace(os.sep, ".")
        for f in files:
            if f.endswith(".py"):
                is_pkg = f == "__init__.py"
                out[rel if is_pkg else f"{rel}.{f[:-3]}"] = (os.path.join(root, f), is_pkg)
            elif f.endswith((".so", ".pyd")):
                out[f"{rel}.{f.split('.')[0]}"] = (None, False)
    return out


MODULES = _modules()


def _is_main_guard(node) -> bool:
    """``if __name__ == "__main__":`` (its body runs when the file is a script, never on import)."""
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value == "__main__")


def _targets(node, name: str, is_pkg: bool):
    """The package modules an import statement of module ``name`` names (``None`` for a name
    that is not in the package; the package itself for a name defined in an ``__init__``)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PKG or alias.name.startswith(PKG + "."):
                parts = alias.name.split(".")
                yield next(".".join(parts[:k]) for k in range(len(parts), 0, -1)
                           if ".".join(parts[:k]) in MODULES or k == 1)
        return
    if node.level:
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        base = ".".join(base + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base != PKG and not base.startswith(PKG + "."):
        return
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        yield sub if sub in MODULES else (base if base in MODULES else None)


def import_graph():
    """{module: {target: "module" or "function"}}: where each package import of each module
    sits (function wins over nothing, module over function); ``__main__`` guards are left out.
    Also the imports whose target does not exist, as (module, line, statement)."""
    graph, unresolved = {}, []
    for name, (path, is_pkg) in MODULES.items():
        edges = graph.setdefault(name, {})
        if path is None:
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)

        def visit(node, level):
            for child in ast.iter_child_nodes(node):
                if _is_main_guard(child):
                    continue
                inner = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                         ast.Lambda)) else level
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(child, name, is_pkg):
                        if target is None:
                            unresolved.append((name, child.lineno, ast.unparse(child)))
                        elif target != name and edges.get(target) != "module":
                            edges[target] = inner
                visit(child, inner)

        visit(tree, "module")
    return graph, unresolved


def find_cycle(graph, kinds):
    """A cycle (list of modules, first = last) over the edges of ``kinds``, or None."""
    state, stack = {}, []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for t, kind in sorted(graph.get(m, {}).items()):
            if kind not in kinds:
                continue
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = dfs(t)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


def test_graph_is_read():
    graph, unresolved = import_graph()
    assert not unresolved, f"imports of package modules that do not exist: {unresolved}"
    # a few edges the package is known to have, one of each kind of statement
    assert graph["fwpkm_ext.stream"].get("fwpkm_ext.model") == "module"  # from .model import ...
    assert graph["fwpkm_ext.cli"].get("fwpkm_ext.cli.stream") == "module"  # from . import stream
    assert graph["fwpkm_ext.cli.info"].get("fwpkm_ext") == "module"  # from .. import build_info
    assert "fwpkm_ext.cli" not in graph["fwpkm_ext.stream"]  # its __main__ guard is left out


def test_no_cycle_among_module_level_imports():
    graph, _ = import_graph()
    cycle = find_cycle(graph, {"module"})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_hidden_in_function_level_imports():
    graph, _ = import_graph()
    cycle = find_cycle(graph, {"module", "function"})
    assert cycle is None, "import cycle through a function-level import: " + " -> ".join(cycle)


# the driver imports torch once, then imports each module in a forked child, which is a fresh
# process as far as fwpkm_ext is concerned (and costs no second torch import); without fork, a
# new interpreter per module
DRIVER = r"""
import importlib, json, os, subprocess, sys, traceback
import torch  # noqa: F401
failed = {}
for name in json.loads(sys.argv[1]):
    if hasattr(os, "fork"):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                importlib.import_module(name)
                code = 0
            except BaseException:
                os.write(w, traceback.format_exc().encode())
                code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            err = f.read().decode()
        ok = os.waitpid(pid, 0)[1] == 0
    else:
        p = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
        ok, err = p.returncode == 0, p.stderr
    if not ok:
        failed[name] = err[-2000:]
print(json.dumps(failed))
"""


#: modules of optional integrations and the library (an extra) each needs: imported only where
#: that library is installed
OPTIONAL = {"fwpkm_ext.integrations.transformers": "transformers"}


def test_every_public_module_imports_alone(tmp_path):
    import importlib.util

    public = sorted(m for m, (path, _) in MODULES.items()
                    if path and not any(p.startswith("_") for p in m.split("."))
                    and (m not in OPTIONAL or importlib.util.find_spec(OPTIONAL[m]) is not None))
    assert {"fwpkm_ext", "fwpkm_ext.cli", "fwpkm_ext.stream", "fwpkm_ext.cli.stream"} <= set(public)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.path.dirname(PKG_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(public)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(f"{m}:\n{e}" for m, e in failed.items())
