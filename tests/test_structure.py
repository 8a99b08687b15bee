"""The package's shape, read from its source with ast: no import circle (module- and
function-level imports alike), the dependency arrow pointing down (the data layer imports no
model, the losses no model code, the model no file format), no private name imported across
modules, no module over 500 lines, no algorithm chosen by comparing its name, and every
recipe's YAML keys learnable from at most three files."""

import ast
import re
import dataclasses
import importlib
import typing
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "jaxalign"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path):
    """(imported module, [names]) for every import statement anywhere in the module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from jaxalign.train import sft` depends on the module sft, not on the package
            submodules = [n for n in names if f"{base}.{n}" in MODULES]
            for n in submodules:
                yield f"{base}.{n}", []
            if len(submodules) < len(names):
                yield base, [n for n in names if n not in submodules]


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. A submodule's implicit import of its parent
    packages is left out: Python binds a package before running its __init__, so a package
    that re-exports its submodules is not a circle."""
    return {name: {mod for mod, _ in _imports(name, path) if mod in MODULES} - {name}
            for name, path in MODULES.items()}


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert len(MODULES) > 40
    cycle = _find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


FORBIDDEN = {
    "data": ("jaxalign.models", "jaxalign.generate", "jaxalign.checkpoint", "jaxalign.train",
             "jaxalign.synth", "jaxalign.losses", "jaxalign.convert"),
    "losses": ("jaxalign.models", "jaxalign.train", "jaxalign.data", "jaxalign.checkpoint"),
    "models": ("jaxalign.convert", "jaxalign.train", "jaxalign.data", "jaxalign.checkpoint"),
    "synth": ("jaxalign.train",),
}


def test_the_import_reader_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from jaxalign.generate import _x\n")
    assert list(_imports("jaxalign.m", f)) == [("jaxalign.generate", ["_x"])]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_down(package):
    inside = f"jaxalign.{package}"
    bad = [f"{name} imports {mod}" for name, path in MODULES.items()
           if name == inside or name.startswith(inside + ".")
           for mod, _ in _imports(name, path)
           if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN[package])]
    assert not bad, "\n".join(bad)


def test_checkpoint_imports_nothing_from_train():
    deps = _graph()["jaxalign.checkpoint"]
    assert not [d for d in deps if d.startswith("jaxalign.train")], deps


def test_no_private_name_imported_across_modules():
    bad = [f"{name}: from {mod} import {n}" for name, path in MODULES.items()
           for mod, names in _imports(name, path) if mod.startswith("jaxalign")
           for n in names if n.startswith("_")]
    assert not bad, bad


def test_modules_under_500_lines():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > 500}
    assert not long, long


def test_no_algorithm_chosen_by_name():
    """The RL driver, roles and config read an objective's properties, never its name."""
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                    isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops) and any(
                    isinstance(x, ast.Attribute) and x.attr == "algorithm" or
                    isinstance(x, ast.Name) and x.id == "algorithm"
                    for x in [node.left, *node.comparators]):
                bad.append(f"{name}:{node.lineno}")
    assert not bad, bad


def _section_modules(cls, seen=None) -> set[str]:
    """Modules defining `cls` and every dataclass reachable through its fields."""
    seen = set() if seen is None else seen
    if cls in seen:
        return set()
    seen.add(cls)
    out = {cls.__module__}
    for hint in typing.get_type_hints(cls).values():
        for t in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(t):
                out |= _section_modules(t, seen)
    return out


def test_recipe_configs_span_at_most_three_files():
    from jaxalign.train.recipes import RECIPES
    for name, recipe in RECIPES.items():
        config_cls, run = recipe.load()
        assert callable(run)
        files = _section_modules(config_cls)
        assert len(files) <= 3, (name, sorted(files))


def _tracked_files() -> list[Path]:
    """The repository's files: git's list in a checkout, else every file outside hidden,
    cache and run folders (an unpacked archive)."""
    import subprocess
    root = PKG.parent
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
    if out.returncode == 0 and out.stdout:
        return [root / name for name in out.stdout.decode().split("\0") if name]
    skip = {"__pycache__", "runs", "data", "build", "dist"}
    return [p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") or part in skip or part.endswith(".egg-info")
        for part in p.relative_to(root).parts)]


# Notes kept outside the repository are unreadable to whoever clones it: the design lives in
# docs/architecture.md. (Spelled in pieces so that this file does not cite them itself.)
OUTSIDE = [re.compile(p, re.IGNORECASE) for p in
           (r"\bDESIGN" r"\.md\b", r"\bSTYLE" r"\.md\b", r"\.\./" r"shared\b", r"/work/" r"shared")]


def test_no_file_cites_notes_outside_the_repo():
    files = _tracked_files()
    assert any(f.name == "README.md" for f in files) and len(files) > 100
    bad = [f"{f.relative_to(PKG.parent)}:{i}: {line.strip()}"
           for f in files if f.is_file() and f.suffix not in (".png", ".safetensors")
           for i, line in enumerate(f.read_text(errors="ignore").splitlines(), 1)
           if any(p.search(line) for p in OUTSIDE)]
    assert not bad, "cite docs/architecture.md instead:\n" + "\n".join(bad)


def test_architecture_doc_is_in_the_repo_and_linked():
    root = PKG.parent
    assert (root / "docs" / "architecture.md").is_file()
    assert "docs/architecture.md" in (root / "README.md").read_text()


def test_every_recipe_reaches_every_reader():
    """RECIPES is the one list of trainers: each row is a CLI command, a `jaxalign plan`
    recipe (planned, or refused by name), a pipeline stage with its section and wiring, a
    progress line and a section of the config reference (docs/config.md)."""
    from jaxalign import pipeline, reference
    from jaxalign.cli import build_parser
    from jaxalign.config import ConfigError
    from jaxalign.train import plan
    from jaxalign.train.recipes import RECIPES
    commands = build_parser()._subparsers._group_actions[0].choices
    config_md = (PKG.parent / "docs" / "config.md").read_text()
    pipeline_fields = {f.name for f in dataclasses.fields(pipeline.PipelineConfig)}
    for name, recipe in RECIPES.items():
        assert name in commands, name
        if recipe.planner is None:
            with pytest.raises(ConfigError, match=f"{name} is not planned yet"):
                plan.planner(name)
        else:
            assert isinstance(plan.planner(name), plan.Planner), name
        assert name in pipeline.ORDER and name in pipeline.STAGES and name in pipeline_fields
        assert (name in pipeline.POLICY_STAGES) == recipe.policy
        assert all(i.stage in pipeline.ORDER[:pipeline.ORDER.index(name)] for i in recipe.inputs)
        assert recipe.progress, name
        assert reference.config_class(name) is recipe.load()[0]
        assert f"\n## jaxalign {name}\n" in config_md, name


def test_pipeline_wiring_follows_the_recipe_rows():
    """The defaults `wire` fills in come from each row's inputs (model.path from the sft run,
    ppo's reward model from the rm run unless reward functions are given)."""
    from jaxalign import pipeline
    cfg = pipeline.PipelineConfig(out_dir="/p", model="/m", sft={}, rm={}, ppo={}, dpo={},
                                  kto={}, eval={}, export={})
    wired = dict(pipeline.wire(cfg))
    assert wired["sft"]["model"]["path"] == "/m"
    assert all(wired[s]["model"]["path"] == "/p/sft" for s in ("rm", "ppo", "dpo", "kto"))
    assert wired["ppo"]["reward"]["model"] == "/p/rm"
    assert set(wired["eval"]["models"]["policies"]) == {"sft", "ppo", "dpo", "kto"}
    assert wired["export"]["model"] == "/p/kto"
    with_functions = pipeline.PipelineConfig(out_dir="/p", model="/m", rm={},
                                             ppo={"reward": {"functions": ["m:f"]}})
    assert "model" not in dict(pipeline.wire(with_functions))["ppo"]["reward"]
    alone = dict(pipeline.wire(pipeline.PipelineConfig(out_dir="/p", model="/m", dpo={})))
    assert alone["dpo"]["model"]["path"] == "/m"


def test_test_modules_share_through_conftest_only():
    """Shared set-up lives in tests/conftest.py; a test module that imports another runs that
    module's fixtures and helpers under two names and couples their set-ups."""
    tests = Path(__file__).resolve().parent
    own = {p.stem for p in tests.glob("test_*.py")}
    bad = [f"{p.name}: imports {mod}" for p in sorted(tests.glob("*.py"))
           for node in ast.walk(ast.parse(p.read_text()))
           for mod in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
           if mod.split(".")[0] in own]
    assert not bad, bad


# The loop shell's parts, and the only modules that may use each: a loop that built its own
# writer, guard or stop handling would drift from the shell's safety rules.
SHELL_PARTS = {"MetricsWriter": {"jaxalign.train.shell"}, "Progress": {"jaxalign.train.shell"},
               "BadStepGuard": {"jaxalign.train.shell"}, "Preempted": {"jaxalign.train.shell"},
               # setup.py holds signals from the start of loading (run_recipe)
               "StopFlag": {"jaxalign.train.shell", "jaxalign.train.setup"}}


def test_only_the_shell_writes_metrics_and_handles_preemption():
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(
                    f, ast.Attribute) else None
                if called in SHELL_PARTS and name not in SHELL_PARTS[called]:
                    bad.append(f"{name}:{node.lineno} calls {called}")
    assert not bad, bad
