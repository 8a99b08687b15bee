"""The config reference: every key of every command's YAML with its type, default and
meaning, printed by `jaxalign config NAME` and written to docs/config.md.

One source for the meanings: the comment written beside each field of the config classes
(a trailing `# ...`, else the comment lines just above the field, else the field's row in the
class docstring, `name   meaning`); a section's meaning is its class docstring's first
sentence. tests/test_configs.py checks that every field of every registered class has one
and that docs/config.md is what `jaxalign config --markdown` prints.

A command joins the reference by one row in CONFIGS ("module:Class", imported only when
asked for, so `jaxalign --help` imports no JAX).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

from jaxalign.train.recipes import RECIPES

# command -> "module:ConfigClass". The training recipes, then the other YAML-driven commands.
CONFIGS: dict[str, str] = {
    **{name: recipe.config for name, recipe in RECIPES.items()},
    "eval": "jaxalign.evaluate:EvalConfig",
    "prepare": "jaxalign.data.prepare:PrepareConfig",
    "pipeline": "jaxalign.pipeline:PipelineConfig",
}

# The runtime flags every command takes, and the config keys they set on the YAML-driven
# commands (applied after the YAML file, before any key=value override). Documented once, here.
RUNTIME_FLAGS: dict[str, tuple[str, str]] = {
    "--mesh": ("mesh", "device mesh, e.g. data=1,fsdp=-1,tensor=1 (one axis may be -1: the "
                       "devices left); default: every device on fsdp"),
    "--dtype": ("model.dtype", "compute dtype, float32 or bfloat16 (parameters stay in "
                               "model.param_dtype)"),
}


def config_class(name: str) -> type:
    module, _, attr = CONFIGS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass(frozen=True)
class Key:
    name: str          # dotted, as in a key=value override; list items as `data.train[].path`
    type: str
    default: str       # as YAML writes it, or "required"
    meaning: str
    section: bool = False


# ----------------------------------------------------------------------------- meanings

def _first_sentence(text: str) -> str:
    """Up to the first full stop outside parentheses ("(False: Dr. GRPO, ...)" stays whole)."""
    text = " ".join(text.split())
    for m in re.finditer(r"(?<=[a-z0-9)\]'\"`])\. (?=[A-Z(`'\"])", text):
        if text[:m.start()].count("(") == text[:m.start()].count(")"):
            return text[:m.start() + 1]
    return text.strip()


@functools.lru_cache(maxsize=None)
def _class_comments(cls: type) -> dict[str, str]:
    """field -> the comment beside it in `cls`'s own source."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    src = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    code_lines = src.splitlines()
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        if trailing:
            out[node.target.id] = " ".join(trailing)
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and code_lines[n - 1].strip().startswith("#"):
            above.insert(0, comments.get(n, ""))
            n -= 1
        if above:
            out[node.target.id] = " ".join(above)
    return out


@functools.lru_cache(maxsize=None)
def _docstring_table(cls: type) -> dict[str, str]:
    """`name[, name]   meaning` rows of the class docstring (continuation lines indented)."""
    doc = _own_doc(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out, current = {}, None
    for line in doc.splitlines():
        m = re.match(r"^(\s*)([\w, ]+?)\s{2,}(\S.*)$", line)
        keys = [k.strip() for k in m.group(2).split(",")] if m else []
        if m and keys and all(k in names for k in keys):
            current = (keys, len(m.group(1)), [m.group(3)])
            for k in keys:
                out[k] = current[2]
        elif current and line.strip() and len(line) - len(line.lstrip()) > current[1]:
            current[2].append(line.strip())
        else:
            current = None
    return {k: " ".join(v) for k, v in out.items()}


def _own_doc(cls: type) -> str:
    """The class docstring, not the signature `dataclass` puts there when there is none."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(cls.__name__ + "(") else inspect.cleandoc(doc)


def _doc_sentence(cls: type) -> str:
    doc = _own_doc(cls)
    first = doc.split("\n\n")[0]
    if re.match(r"^\s*[\w, ]+?\s{2,}\S", first):  # a table, not a sentence
        return ""
    return _first_sentence(first)


def field_meaning(cls: type, name: str) -> str:
    """The meaning of field `name` of `cls`, from the class in its MRO that declares it."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            text = _class_comments(klass).get(name) or _docstring_table(klass).get(name, "")
            return _first_sentence(text)
    return ""


# ----------------------------------------------------------------------------- keys

def _section_type(hint) -> tuple[type | None, bool]:
    """(dataclass, is_a_list) when the field holds a config section or a list of them."""
    if dataclasses.is_dataclass(hint):
        return hint, False
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
        return args[0], True
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if dataclasses.is_dataclass(a):
                return a, False
    return None, False


def type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is tuple:
        inner = args[0] if args else Any
        return f"list of {type_name(inner)}"
    return getattr(hint, "__name__", str(hint))


def yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return str(value)


def _default(f: dataclasses.Field, holder) -> tuple[bool, Any]:
    """(has a default, value); `holder`: the section's default instance, whose values win
    (RLConfig's optim defaults lr to 1e-5, not OptimConfig's 2e-5)."""
    if holder is not None:
        return True, getattr(holder, f.name)
    if f.default is not dataclasses.MISSING:
        return True, f.default
    if f.default_factory is not dataclasses.MISSING:
        return True, f.default_factory()
    return False, None


def keys(cls: type, prefix: str = "", holder=None) -> list[Key]:
    """Every key of `cls`, sections expanded in place (a section row, then its keys)."""
    out = []
    hints = typing.get_type_hints(cls)
    # Plain keys first, then the sections, so that a section's rows end where it ends.
    fields = sorted(dataclasses.fields(cls), key=lambda f: _section_type(hints[f.name])[0] is not None)
    for f in fields:
        hint = hints[f.name]
        name = prefix + f.name
        has_default, value = _default(f, holder)
        section, is_list = _section_type(hint)
        meaning = field_meaning(cls, f.name)
        if section is not None:
            meaning = meaning or _doc_sentence(section)
            if is_list:
                out.append(Key(name, type_name(hint), yaml_value(value)
                               if has_default else "required", meaning, section=True))
                out += keys(section, name + "[].")
            else:
                out.append(Key(name, type_name(hint), "" if has_default else "required", meaning,
                               section=True))
                sub_holder = value if dataclasses.is_dataclass(value) else None
                out += keys(section, name + ".", sub_holder)
            continue
        out.append(Key(name, type_name(hint), yaml_value(value) if has_default else "required",
                       meaning))
    return out


# ----------------------------------------------------------------------------- output

def render_text(name: str) -> str:
    cls = config_class(name)
    rows = keys(cls)
    width = max(len(k.name) for k in rows)
    twidth = min(max(len(k.type) for k in rows), 28)
    lines = [f"jaxalign {name}: the keys of its YAML config ({cls.__module__}.{cls.__name__});",
             "any key can also be given on the command line as key=value.", ""]
    for k in rows:
        if k.section:
            lines.append("")
            default = {"": "", "required": "  (required)"}.get(k.default, f"  (default {k.default})")
            lines.append(f"{k.name}:  {k.meaning}{default}")
            continue
        lines.append(f"  {k.name:<{width}}  {k.type:<{twidth}}  {k.default:<10}  {k.meaning}")
    return "\n".join(lines).rstrip() + "\n"


def sections(name: str) -> list[tuple[str, str]]:
    """The top-level keys of a command's config: [(key, meaning)] (for `--help`)."""
    return [(k.name, k.meaning) for k in keys(config_class(name)) if "." not in k.name]


def render_markdown() -> str:
    out = ["# Config reference", "",
           "Generated from the config classes by `jaxalign config --markdown > docs/config.md`;",
           "`jaxalign config NAME` prints one command's keys. tests/test_configs.py checks that",
           "this file is up to date. Every key can be set in the YAML file or on the command line",
           "as `key=value` (dotted: `train.steps=10`, `data.train=[{path: a.jsonl}]`).", "",
           "## Runtime flags", "",
           "Every command takes these flags. On the YAML-driven commands they set config keys",
           "(applied after the YAML file, before any `key=value`):", "",
           "| flag | key | meaning |", "|---|---|---|"]
    for flag, (key, meaning) in RUNTIME_FLAGS.items():
        out.append(f"| `{flag}` | `{key}` | {meaning} |")
    for name in CONFIGS:
        cls = config_class(name)
        out += ["", f"## jaxalign {name}", "", f"`{cls.__module__}.{cls.__name__}`; "
                + flags_text(cls), "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        for k in keys(cls):
            key = f"**`{k.name}`**" if k.section else f"`{k.name}`"
            cells = [c.replace("|", "\\|") for c in (k.type, k.default, k.meaning)]
            out.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# Commands whose runtime flags do not map onto keys of their own config.
FLAG_NOTES: dict[str, str] = {
    "PipelineConfig": "`--mesh` and `--dtype` set each stage's own mesh and dtype keys, in every "
                      "stage that has them.",
    "PrepareConfig": "`--mesh` and `--dtype` are accepted and change nothing: the data stage "
                     "runs no model.",
}


def flags_text(cls: type) -> str:
    """Which keys the runtime flags set on this config (or that they are refused)."""
    if cls.__name__ in FLAG_NOTES:
        return FLAG_NOTES[cls.__name__]
    parts = []
    for flag, kw in (("--mesh", {"mesh": _ExampleMesh()}), ("--dtype", {"dtype": "bfloat16"})):
        try:
            keys_set = [o.partition("=")[0] for o in flag_overrides(cls, **kw)]
            parts.append(f"`{flag}` sets " + ", ".join(f"`{k}`" for k in keys_set))
        except ValueError:
            parts.append(f"`{flag}` is refused (no such key)")
    return "; ".join(parts) + "."


@dataclasses.dataclass
class _ExampleMesh:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


def flag_overrides(cls: type, *, mesh=None, dtype: str | None = None) -> list[str]:
    """The key=value overrides that `--mesh` / `--dtype` stand for on a config class;
    ValueError when the class has no such key (a usage error)."""
    names = {k.name for k in keys(cls)}
    out = []
    if mesh is not None:
        key = RUNTIME_FLAGS["--mesh"][0]
        if f"{key}.data" not in names:
            raise ValueError(f"--mesh: this command's config has no {key} section")
        out += [f"{key}.{f.name}={getattr(mesh, f.name)}" for f in dataclasses.fields(mesh)]
    if dtype is not None:
        # model.dtype where there is one, else the config's own compute-dtype key (eval.dtype).
        candidates = [RUNTIME_FLAGS["--dtype"][0]] + sorted(
            (k.name for k in keys(cls) if k.name.rpartition(".")[2] == "dtype" and "[]" not in k.name),
            key=lambda k: k.count("."))
        key = next((k for k in candidates if k in names), None)
        if key is None:
            raise ValueError("--dtype: this command's config has no dtype key")
        out.append(f"{key}={dtype}")
    return out
