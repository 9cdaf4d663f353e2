"""The package's layering, read from the source with `ast`: imports flow one way, the loop stays small."""

from __future__ import annotations

import ast
from pathlib import Path

import microft

PKG = Path(microft.__file__).resolve().parent  # the package under test (a checkout or an installed copy)
MAX_LINES = 80  # a function a reader takes in at once

# what models/ sits above: the model core may import only itself, config, weights and errors
ABOVE_MODELS = ("cli", "options", "ui", "runs", "estimating", "train", "memory", "generate", "data", "export",
                "download", "perf")


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The microft modules the file at `path` imports anywhere (top level or inside a function)."""
    name = _module(path)
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from microft.memory import estimate`
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    paths = sorted(PKG.rglob("*.py"))
    modules = {_module(p) for p in paths}
    return {_module(p): _imports(p, modules) for p in paths}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_the_graph_is_read():
    """The reader sees what it must: a known top-level, a lazy (in-function) and a package import."""
    g = _graph()
    assert "microft.train.step" in g["microft.train.loop"]
    assert "microft.memory.plan" in g["microft.runs"]  # imported inside a function
    # `from microft.memory import estimate as memory`
    assert "microft.memory.estimate" in g["microft.estimating"]


def test_no_import_cycles():
    g = _graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_loop_never_imports_the_estimator():
    g = _graph()
    bad = {m: sorted(d for d in deps if _layer(d) == "memory")
           for m, deps in g.items() if _layer(m) == "train"}
    assert not any(bad.values()), bad


def test_models_import_nothing_above_them():
    g = _graph()
    bad = {m: sorted(d for d in deps if _layer(d) in ABOVE_MODELS)
           for m, deps in g.items() if _layer(m) == "models"}
    assert not any(bad.values()), bad
    # and the run config (below models) does not reach up into them
    assert not {d for d in g["microft.config"] if _layer(d) == "models"}


def test_the_optimizer_registry_sits_below_the_config():
    """microft/optimizers.py: the config validates --optimizer against it, so at import it reaches nothing
    above the config (errors, layouts; no torch). Its builders import microft's own optimizer classes from
    train/ inside the function: the one arrow up, from an entry to its implementation, taken only when a run
    builds one; those modules import neither the config nor the registry (test_no_import_cycles)."""
    tree = ast.parse((PKG / "optimizers.py").read_text())
    top = {n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)}
    top = {m for m in top | {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
           if m.startswith("microft")}
    assert top <= {"microft.errors", "microft.layouts"}, top
    lazy = _graph()["microft.optimizers"] - top
    assert lazy and all(_layer(m) == "train" for m in lazy), lazy
    assert "microft.optimizers" in _graph()["microft.config"]


def test_functions_are_short():
    """No function anywhere in the package runs over MAX_LINES: a reader takes each in at once."""
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def _calls(path: Path) -> set[str]:
    return {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
            for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)}


def test_the_trace_runs_the_loops_step_and_patches_nothing():
    """memory/trace.py measures the loop's own step (`micro_step`, `finish_step`) and reaches the model only
    through its hooks: it assigns no attribute of a module it imports (no monkey-patching)."""
    trace, loop = PKG / "memory" / "trace.py", PKG / "train" / "loop.py"
    assert {"micro_step", "finish_step"} <= _calls(trace) & _calls(loop)
    tree = ast.parse(trace.read_text())
    modules = {a.asname or a.name.split(".")[0]
               for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    package_files = {str(p.relative_to(PKG.parent).with_suffix("")) for p in PKG.rglob("*.py")}
    modules |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
                if n.module and f"{n.module}.{a.name}".replace(".", "/") in package_files}
    patched = [ast.unparse(t) for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
               if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in modules]
    assert not patched, patched


PRECISION_WORDS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true", "bf16", "fp16")


def _precision_words(node: ast.AST) -> bool:
    """Whether `node` is a --precision word, or a tuple/list/set of them (or a prefix: "bf16")."""
    if isinstance(node, ast.Constant):
        return node.value in PRECISION_WORDS
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(_precision_words(e) for e in node.elts)


def test_precision_is_a_policy_not_a_word_compared():
    """Code branches on `resolved.PrecisionPolicy`'s attributes (autocast, grad_scaler, master_weights, ...),
    never on the --precision word: no `precision == "fp16-mixed"`, `in ("bf16-mixed", ...)`, set algebra
    with them or `.startswith("bf16")` outside resolved.py (the policies themselves) and config.py (the flag
    as typed, checked before any policy is resolved)."""
    words = []
    for path in sorted(PKG.rglob("*.py")):
        if path.relative_to(PKG).as_posix() in ("resolved.py", "config.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            compared = [node.left, *node.comparators] if isinstance(node, ast.Compare) else (
                [node.left, node.right] if isinstance(node, ast.BinOp) else [])  # {was, now} & {"bf16-true"}
            if any(map(_precision_words, compared)):
                words.append(f"{path.relative_to(PKG)}:{node.lineno} {ast.unparse(node)}")
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("startswith", "endswith")
                  and any(map(_precision_words, node.args))):
                words.append(f"{path.relative_to(PKG)}:{node.lineno} {ast.unparse(node)}")
    assert not words, words


def test_the_command_line_starts_without_torch_or_the_model_and_data_layers():
    """`import microft.cli` (every command's start-up, `--help` and `download` all of theirs) loads neither
    torch nor the modules a flag's help could pull in by reading a registry (the model config's pydantic
    models, the instruction-data module): those cost ~50 ms a start."""
    import subprocess
    import sys

    heavy = ("torch", "numpy", "microft.models.config", "microft.data.instruct")
    code = f"import sys, microft.cli\nprint([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)
