"""The house rules, checked on the source: what the project cites and how its modules depend on each other."""

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PROJECT_FILES = [p for top in ("advprop_tf", "configs", "tests", "tools") for p in (REPO / top).rglob("*")
                 if p.is_file() and p.suffix in (".py", ".flags", ".md")] + [REPO / "README.md"]


def test_sources_are_cited_by_what_the_project_or_the_public_holds():
    """Configs, code and tests cite the paper or the authors' repository and file, never a note that is not
    part of the project."""
    private_note = "FACTS" + ".md"
    citing = [str(p.relative_to(REPO)) for p in PROJECT_FILES if private_note in p.read_text(encoding="utf-8")]
    assert citing == []
    assert os.path.exists(REPO / "configs" / "b3.flags")  # the walk saw the project


PACKAGE = REPO / "advprop_tf"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_only_methods_name_a_method_and_only_the_domain_spec_spells_a_domain():
    """No branching on a method's name outside its registry; the main domain and the adversarial-name rule are
    decided once (domains.py)."""
    offenders = {}
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        name = module_name(path)
        if name != "advprop_tf.methods" and ("fast_advprop" in text or '"advprop"' in text):
            offenders.setdefault(name, []).append("a method's name")
        if name != "advprop_tf.domains" and ('"clean"' in text or 'startswith("adv")' in text):
            offenders.setdefault(name, []).append("a domain's name")
        if "SimpleNamespace" in text or "str(e).split" in text:
            offenders.setdefault(name, []).append("a flag namespace or a message taken apart")
    assert offenders == {}


# Layers, low to high: a module imports only from its own layer or below (and never a command line's module).
LAYERS = [
    {"advprop_tf.errors", "advprop_tf.paths", "advprop_tf.randomness", "advprop_tf.domains", "advprop_tf.startup",
     "advprop_tf.data", "advprop_tf.attacks", "advprop_tf.models", "advprop_tf.benchmarking"},
    {"advprop_tf.methods"},
    {"advprop_tf.config"},
    {"advprop_tf.training.run_dir", "advprop_tf.training.ema", "advprop_tf.training.strategy",
     "advprop_tf.training.optimization", "advprop_tf.training.preemption", "advprop_tf.training.trained"},
    {"advprop_tf.evaluation"},
    {"advprop_tf.training", "advprop_tf.serving", "advprop_tf.conversion"},
    {"advprop_tf.cli", "advprop_tf.train_flags", "advprop_tf.train", "advprop_tf.evaluate", "advprop_tf.export"},
    {"advprop_tf"},  # the package's lazy entry points
]


def layer_of(module):
    best = None
    for rank, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (rank, prefix)
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def imports_of(path):
    import ast

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("advprop_tf"):
            for alias in node.names:  # `from advprop_tf.training import builders` imports a module
                submodule = f"{node.module}.{alias.name}"
                yield submodule if (REPO / (submodule.replace(".", "/") + ".py")).exists() or \
                    (REPO / submodule.replace(".", "/")).is_dir() else node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("advprop_tf"))


def test_imports_point_down():
    upward = []
    for path in SOURCES:
        here = module_name(path)
        for imported in imports_of(path):
            if layer_of(imported) > layer_of(here):
                upward.append(f"{here} -> {imported}")
    assert upward == []


def test_no_function_is_longer_than_80_lines_except_network_builders():
    import ast

    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                builder = path.parent.name == "models" and node.name == "__init__"
                if length > 80 and not builder:
                    long.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert long == []
