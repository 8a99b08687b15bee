"""Reading a dataset spec into a list of plain dict rows.

Local .jsonl, .json and .csv files are read here, row by row as written: `datasets` would
decode each column to one type first, so a number in the fourth row of a string column
turned the whole column into something else and the error blamed row 0. Reading them
ourselves keeps every value as the file has it (CSV cells are strings; an empty cell is
null, as `datasets` reads it) and gives every row its line number for errors.
.parquet / .arrow files (typed columns already), `save_to_disk` folders, folders of data
files and hub names go through HF `datasets`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
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


def _object(obj, path: Path, line: int) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{path}: line {line}: expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_json_lines(path: Path):
    """(1-based line, parsed value) of each non-blank line of a JSON-lines file, streamed.
    Raises DataError naming the file and line of the first malformed one."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                raise DataError(f"{path}: line {n}: malformed JSON ({detail})") from None
            yield n, obj


def read_json_lines(path: Path) -> tuple[list[dict], list[int]]:
    """Rows of a JSON-lines file and the 1-based line of each (blank lines skipped).
    Raises DataError naming the file and line of the first line that is not a JSON object."""
    rows, lines = [], []
    for n, obj in iter_json_lines(path):
        rows.append(_object(obj, path, n))
        lines.append(n)
    return rows, lines


def read_json_array(path: Path, text: str) -> tuple[list[dict], list[int]]:
    """Rows of a JSON array of objects, each with the line its object starts on."""
    decoder, rows, lines = json.JSONDecoder(), [], []
    skip = re.compile(r"\s*")
    i = skip.match(text, text.index("[") + 1).end()
    try:
        if text[i] != "]":
            while True:
                line = text.count("\n", 0, i) + 1
                obj, i = decoder.raw_decode(text, i)
                rows.append(_object(obj, path, line))
                lines.append(line)
                i = skip.match(text, i).end()
                if text[i] == "]":
                    break
                if text[i] != ",":
                    raise json.JSONDecodeError("expected ',' or ']'", text, i)
                i = skip.match(text, i + 1).end()
        if text[i + 1:].strip():
            raise json.JSONDecodeError("extra data after the array", text, i + 1)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except IndexError:
        raise DataError(f"{path}: malformed JSON (the array is not closed)") from None
    return rows, lines


def read_csv(path: Path) -> tuple[list[dict], list[int]]:
    """Rows of a CSV file with a header line; cells stay strings, an empty cell is null."""
    import csv
    rows, lines = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        start = 2  # the line after the header
        try:
            for row in reader:
                if None in row:
                    raise DataError(f"{path}: line {start}: {len(reader.fieldnames) + len(row[None])} "
                                    f"cells, the header has {len(reader.fieldnames)}")
                rows.append({k: (v if v != "" else None) for k, v in row.items()})
                lines.append(start)
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    return rows, lines


def read_local_file(path: Path) -> tuple[list[dict], list[int]]:
    """(rows as written, line of each row) of a .jsonl / .json / .csv file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return read_csv(path)
        if suffix == ".json":
            text = path.read_text(encoding="utf-8")
            if text.lstrip().startswith("["):
                return read_json_array(path, text)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return read_json_lines(path)  # .jsonl, or a .json file holding JSON lines


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
    if isinstance(spec, str):
        spec = DatasetSpec(path=spec)
    path = Path(os.path.expanduser(spec.path))
    local = _looks_local(spec.path)
    if local and not path.exists():
        raise DataError(f"{path}: dataset path does not exist")
    suffix = path.suffix.lower()
    if local and path.is_file() and suffix not in BUILDERS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {sorted(BUILDERS)}")
    if local and path.is_file() and suffix in (".jsonl", ".json", ".csv"):
        # A local file has a single split, whatever `spec.split` says; the spec's split only
        # selects among a folder's splits.
        rows, lines = read_local_file(path)
        if not rows:
            raise DataError(f"{path}: file has no rows")
        n = spec.max_examples
        return Source(str(path), rows[:n] if n else rows, lines[:n] if n else lines)

    import datasets
    datasets.disable_progress_bars()
    if not local:
        try:
            ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, cache_dir=cache_dir)
        except Exception as e:  # network, unknown repo, bad split: all one error for the user
            raise DataError(f"{spec.path}: not a local path, and loading it from the hub failed: "
                            f"{type(e).__name__}: {e}") from e
        return Source(spec.path, _to_rows(ds, spec, spec.path))
    name = str(path)
    try:
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(path))
            else:  # a folder of data files (or a dataset script / repo layout)
                ds = datasets.load_dataset(str(path), spec.name, split=spec.split, cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(BUILDERS[suffix], data_files=str(path), split="train",
                                       cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: could not be read: {type(e).__name__}: {e}") from e
    rows = _to_rows(ds, spec, name)
    if not rows:
        raise DataError(f"{path}: dataset has no rows")
    return Source(name, rows)
