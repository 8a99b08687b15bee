"""Reading a dataset spec into a list of plain dict rows, through HF `datasets`.

Local files (.json, .jsonl, .csv, .parquet, .arrow), a `save_to_disk` folder, a folder of
data files, or a hub name passed straight to `load_dataset`. Errors name the path, and for
JSON lines the line number: `datasets` reports only a row index that skips blank lines,
so .jsonl (and line-delimited .json) files are checked line by line first (one `json.loads`
per line, nothing kept), which also gives every row its line number for later errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from jaxalign.config import JaxalignError
from jaxalign.data.config import DatasetSpec

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
            ".arrow": "arrow"}


class DataError(JaxalignError):
    """A dataset we cannot use, naming the file and, where there is one, the line, row and field."""


@dataclasses.dataclass
class Source:
    """Rows of one dataset split. `name` is what error messages call it (a path or hub name);
    `lines[i]` is the 1-based line of row i in a JSON-lines file, else None."""

    name: str
    rows: list[dict]
    lines: list[int] | None = None

    def where(self, i: int) -> str:
        line = f" (line {self.lines[i]})" if self.lines is not None and i < len(self.lines) else ""
        return f"{self.name}: row {i}{line}"


def _looks_local(path: str) -> bool:
    """A hub name is `name` or `owner/name`; anything that exists, is absolute, starts with
    '.' or '~', or ends with a data-file extension is a local path."""
    p = Path(os.path.expanduser(path))
    return (p.exists() or p.is_absolute() or path.startswith((".", "~"))
            or p.suffix.lower() in BUILDERS or path.count("/") > 1)


def check_json_lines(path: Path) -> list[int]:
    """Validates a JSON-lines file; returns the 1-based line number of every non-blank line.

    Raises DataError naming the file and line of the first line that is not a JSON object.
    """
    lines = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                raise DataError(f"{path}: line {n}: malformed JSON ({detail})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {n}: expected a JSON object, "
                                f"got {type(obj).__name__}")
            lines.append(n)
    return lines


def _check_json_file(path: Path) -> list[int] | None:
    """A .json file is a JSON array / object (validated whole) or JSON lines."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            with open(path, "rb") as f:
                json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        return None
    return check_json_lines(path)


def _to_rows(ds, spec: DatasetSpec, name: str) -> list[dict]:
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if spec.split not in ds:
            raise DataError(f"{name}: split {spec.split!r} not found; available: {sorted(ds)}")
        ds = ds[spec.split]
    if isinstance(ds, datasets.IterableDataset):
        it = iter(ds)
        n = spec.max_examples
        return [row for _, row in zip(range(n), it)] if n else list(it)
    if spec.max_examples is not None and spec.max_examples < len(ds):
        ds = ds.select(range(spec.max_examples))
    return ds.to_list()


def load_rows(spec: DatasetSpec | str, *, cache_dir: str | None = None) -> Source:
    """Loads one split of a dataset spec as a list of python dict rows."""
    import datasets

    if isinstance(spec, str):
        spec = DatasetSpec(path=spec)
    datasets.disable_progress_bars()
    path = Path(os.path.expanduser(spec.path))
    name = str(path) if _looks_local(spec.path) else spec.path

    if not _looks_local(spec.path):
        try:
            ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, cache_dir=cache_dir)
        except Exception as e:  # network, unknown repo, bad split: all one error for the user
            raise DataError(f"{spec.path}: not a local path, and loading it from the hub failed: "
                            f"{type(e).__name__}: {e}") from e
        return Source(name, _to_rows(ds, spec, name))

    if not path.exists():
        raise DataError(f"{path}: dataset path does not exist")

    lines = None
    try:
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(path))
            else:  # a folder of data files (or a dataset script / repo layout)
                ds = datasets.load_dataset(str(path), spec.name, split=spec.split, cache_dir=cache_dir)
        else:
            suffix = path.suffix.lower()
            if suffix not in BUILDERS:
                raise DataError(f"{path}: unsupported file type {suffix!r}; "
                                f"expected one of {sorted(BUILDERS)}")
            if suffix == ".jsonl":
                lines = check_json_lines(path)
            elif suffix == ".json":
                lines = _check_json_file(path)
            if lines is not None and not lines:
                raise DataError(f"{path}: file has no rows")
            # A local file has a single split, which `datasets` calls 'train' whatever
            # `spec.split` says; the spec's split only selects among a folder's splits.
            ds = datasets.load_dataset(BUILDERS[suffix], data_files=str(path), split="train",
                                       cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: could not be read: {type(e).__name__}: {e}") from e

    rows = _to_rows(ds, spec, name)
    if lines is not None and len(lines) != len(rows) and spec.max_examples is None:
        lines = None  # `datasets` did not map lines to rows one to one; do not report wrong lines
    if not rows:
        raise DataError(f"{path}: dataset has no rows")
    return Source(name, rows, lines)
