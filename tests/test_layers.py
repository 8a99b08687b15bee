"""The dependency arrow points down: the data layer imports no model, the losses no model code,
the model no file format; no private name crosses a module boundary in those packages.
Read from the source (every import, also inside functions), so nothing is imported here."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "jaxalign"

FORBIDDEN = {
    "data": ("jaxalign.models", "jaxalign.generate", "jaxalign.checkpoint", "jaxalign.train",
             "jaxalign.synth", "jaxalign.losses", "jaxalign.convert"),
    "losses": ("jaxalign.models", "jaxalign.train", "jaxalign.data", "jaxalign.checkpoint"),
    "models": ("jaxalign.convert", "jaxalign.train", "jaxalign.data", "jaxalign.checkpoint"),
    "synth": ("jaxalign.train",),
}


def imports(path: Path):
    """(line, module, names) of every `import` / `from ... import` in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, ()
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module, tuple(a.name for a in node.names)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_down(package):
    bad = []
    for path in sorted((PKG / package).glob("*.py")):
        for line, module, names in imports(path):
            full = [module] + [f"{module}.{n}" for n in names]
            if any(m == f or m.startswith(f + ".") for m in full for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {module} {names}")
            bad += [f"{path.relative_to(PKG.parent)}:{line} imports private {module}.{n}"
                    for n in names if module.startswith("jaxalign") and n.startswith("_")]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from jaxalign.generate import _x\n")
    assert list(imports(f)) == [(2, "jaxalign.generate", ("_x",))]
