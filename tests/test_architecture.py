"""The package's layers: dependencies point one way only, no import cycles, and `import hwrjax` stays light.

Layers, lowest first (docs/ARCHITECTURE.md): core < models < training < inference < apps < cli. A module
may import its own layer and the layers below; every import counts, including those inside functions.
"""

import ast
import glob
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "hwrjax")
LAYERS = ("core", "models", "training", "inference", "apps", "cli")
# The package's own __init__ re-exports the public API: above every layer, so no layer may import it.
FACADE = len(LAYERS)
# What the core may import besides the standard library and itself: what other JAX projects have anyway.
CORE_THIRD_PARTY = {"jax", "flax", "optax", "numpy"}
# What `import hwrjax` must not load (the core's promise; they come with the higher layers, on first use).
HEAVY = ("tensorflow", "tensorflow_datasets", "orbax", "ml_collections", "starlette", "uvicorn", "matplotlib",
         "tensorboardX", "scipy")


def module_files(package_dir: str = PACKAGE) -> dict[str, str]:
    """{dotted module name: path} of every module under `package_dir` (packages as their __init__)."""
    out = {}
    base = os.path.dirname(package_dir)
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), base)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(folder, name)
    return out


def imports_of(path: str, name: str, modules: dict[str, str]) -> list[tuple[str, int]]:
    """(imported module, line) of every import in the file, inside functions too; hwrjax modules are
    resolved to the module imported (`from hwrjax.core import steps` imports hwrjax.core.steps)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                parts = name.split(".")[:len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module
            for a in node.names:
                full = f"{module}.{a.name}"
                out.append((full if full in modules else module, node.lineno))
    return out


def layer_of(module: str) -> int | None:
    """The layer index of an hwrjax module, FACADE for the package itself, None outside hwrjax."""
    parts = module.split(".")
    if parts[0] != "hwrjax":
        return None
    if len(parts) == 1:
        return FACADE
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer; put it in one of hwrjax/{{{','.join(LAYERS)}}}/")
    return LAYERS.index(parts[1])


def graph(package_dir: str = PACKAGE) -> tuple[dict[str, str], dict[str, list[tuple[str, int]]]]:
    modules = module_files(package_dir)
    return modules, {m: imports_of(p, m, modules) for m, p in modules.items()}


def upward_imports(modules: dict[str, str], edges: dict[str, list[tuple[str, int]]]) -> list[str]:
    """'module:line imports target (layer a < layer b)' for each import of a higher layer."""
    bad = []
    for module, targets in sorted(edges.items()):
        own = layer_of(module)
        for target, line in targets:
            theirs = layer_of(target)
            if theirs is not None and theirs > own and target != module:
                names = LAYERS + ("hwrjax",)
                bad.append(f"{modules[module]}:{line} ({names[own]}) imports {target} ({names[theirs]})")
    return bad


def cycles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The import cycles between hwrjax modules (strongly connected components of more than one module,
    or a module importing itself)."""
    succ = {m: sorted({t for t, _ in ts if t in edges}) for m, ts in edges.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in succ[v]:
                out.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_layer_and_imports_only_its_own_or_lower_layers():
    modules, edges = graph()
    assert len(modules) > 30  # the walk found the package
    assert upward_imports(modules, edges) == []


def test_no_import_cycles_between_modules():
    _, edges = graph()
    assert cycles(edges) == []


def test_the_core_needs_only_jax_flax_optax_and_numpy():
    modules, edges = graph()
    allowed = CORE_THIRD_PARTY | set(sys.stdlib_module_names) | {"hwrjax"}
    bad = [f"{modules[m]}:{line} imports {t}" for m, ts in edges.items() if layer_of(m) == 0
           for t, line in ts if t.split(".")[0] not in allowed]
    assert bad == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The checks themselves, on a small package shaped like hwrjax with two planted faults."""
    pkg = tmp_path / "hwrjax"
    for layer, body in {"core": "from hwrjax.apps import report\n",  # core -> apps: upward
                        "apps": "def f():\n    from hwrjax.apps import plots\n"}.items():  # report <-> plots
        (pkg / layer).mkdir(parents=True)
        (pkg / layer / "__init__.py").write_text("")
        (pkg / layer / "a.py").write_text(body)
    (pkg / "__init__.py").write_text("from hwrjax.core import a\n")
    (pkg / "apps" / "report.py").write_text("from hwrjax.apps import plots\n")
    (pkg / "apps" / "plots.py").write_text("import numpy\n\n\ndef g():\n    from hwrjax.apps.report import x\n")
    modules, edges = graph(str(pkg))
    bad = upward_imports(modules, edges)
    assert len(bad) == 1 and "(core) imports hwrjax.apps.report (apps)" in bad[0]
    assert cycles(edges) == [["hwrjax.apps.plots", "hwrjax.apps.report"]]


def _public_names() -> set[str]:
    """The names `hwrjax/__init__.py` lists in __all__."""
    with open(os.path.join(PACKAGE, "__init__.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("hwrjax/__init__.py has no __all__")


def _code_in(source: str) -> list[str]:
    """`source` and the Python code held in its string constants (code run in subprocesses)."""
    out = [source]
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"(from|import) hwrjax",
                                                                                          node.value):
            out += _code_in(textwrap.dedent(node.value)) or re.findall(r"(?:from|import) hwrjax[^;\n]*", node.value)
    return out


def missing_imports(source: str, where: str, modules: dict[str, str], public: set[str]) -> list[str]:
    """'where:line module' for each import of an hwrjax (or tests.support) module that does not exist,
    in `source` or in code its strings hold; `from hwrjax import X` must name a module or a public name."""
    bad = []
    for code in _code_in(source):
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "hwrjax"]
                bad += [f"{where}:{node.lineno} {n}" for n in names if n not in modules]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.split(".")[0] == "hwrjax":
                if node.module not in modules:
                    bad.append(f"{where}:{node.lineno} {node.module}")
                elif node.module == "hwrjax":
                    bad += [f"{where}:{node.lineno} hwrjax.{a.name}" for a in node.names
                            if f"hwrjax.{a.name}" not in modules and a.name not in public]
    return bad


def test_every_hwrjax_module_imported_anywhere_exists():
    """Moved modules leave no import of their old path behind, in tests, benchmarks and subprocess code
    too (an editable install of an older checkout could otherwise still answer it)."""
    modules, public = module_files(), _public_names()
    files = [p for pattern in ("hwrjax/**/*.py", "tests/**/*.py", "benchmarks/*.py", "configs/*.py", "*.py")
             for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
             if os.path.abspath(p) != os.path.abspath(__file__)]  # this file's strings hold planted faults
    assert len(files) > 60
    bad = []
    for path in files:
        with open(path) as f:
            bad += missing_imports(f.read(), os.path.relpath(path, ROOT), modules, public)
    assert bad == []
    planted = 'def f():\n    from hwrjax.recognize import Recognizer\nCODE = "import sys; from hwrjax import train"\n'
    assert missing_imports(planted, "x.py", modules, public) == ["x.py:2 hwrjax.recognize", "x.py:1 hwrjax.train"]


def test_import_hwrjax_loads_no_tensorflow_orbax_configs_or_server():
    code = ("import json, sys, hwrjax; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert {"jax", "flax", "optax", "hwrjax"} <= loaded
    assert sorted(loaded & set(HEAVY)) == []


@pytest.mark.parametrize("name, module", [("train_and_evaluate", "hwrjax.apps.train"),
                                          ("load_config", "hwrjax.training.checkpoint"),
                                          ("load_variables", "hwrjax.training.checkpoint"),
                                          ("Recognizer", "hwrjax.apps.recognize")])
def test_higher_layer_names_load_on_first_use(name, module):
    import hwrjax

    assert name in hwrjax.__all__ and name in dir(hwrjax)
    assert getattr(hwrjax, name).__module__ == module
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        hwrjax.no_such_name  # noqa: B018
