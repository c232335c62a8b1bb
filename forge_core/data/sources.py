"""Where training rows come from: every source `--data` / `--valid` (data.train / data.valid) names, read row by row as
(where, n, row) - `where:n:` is how a bad row is named. No tokenizer here; `datasets` and `pyarrow` are imported only
for the sources that need them (pip install 'forge-tune[data]').

    spec                                          read by                                  a row is named
    file.jsonl (any file not below)               one JSON object per line                 file:LINE
    file.json                                     a JSON array of objects, or JSON lines   file:row N / file:LINE
    file.parquet                                  pyarrow, one record batch at a time      file:row N
    file.csv                                      csv.DictReader (every value a string)    file:LINE
    a directory of *.jsonl                        every file, sorted by name               file:LINE
    a `datasets.save_to_disk` directory           its train split                          dir:row N
    a dataset repo directory (README.md with      datasets.load_dataset(dir, subset,       dir[split]:row N
      `configs:`, or parquet/json/csv shards)       split=split): what a Hub download is
    a Hub dataset id `org/name`                   datasets.load_dataset(id, subset,        org/name[split]:row N
                                                    split=split), its cache and HF_HUB_OFFLINE

A dataset spec may carry its subset and split, `org/name:subset@split`; else data.subset / data.split (split
default "train"). data.valid may name another split of the train dataset (`test`, `validation`), or be a fraction
(`0.05`): that share of the train source's rows, chosen by a fixed hash of the row's position (HOLDOUT_SEED), is held
out for validation and left out of training.

Memory: files are read a line or a record batch at a time and `datasets` memory-maps its Arrow cache, so a source
is never held whole as text; what stays in memory is what the loaders keep of each row (its token ids and mask,
about 9 bytes per token), the same as for JSONL.
"""

from __future__ import annotations

import csv
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from forge_core.errors import ForgeError, located

HOLDOUT_SEED = 0
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?(@[\w.:\[\]%+-]+)?$")
_FRACTION = re.compile(r"^0?\.\d+$")
BATCH_ROWS = 1024  # parquet rows decoded at a time


class RowProblem(ValueError):
    """One row is unusable; the message says what is wrong, without the location."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # a Hub id or a local dataset directory
    subset: str | None
    split: str

    @property
    def where(self) -> str:
        return f"{self.name}[{self.split}]"


def source_rows(spec, data=None):
    """(where, n, row) of the source `spec` names; `data` (DataConfig) gives the subset, split and a held-out
    validation fraction. A row is a dict, or a RowProblem for a line that is not one."""
    spec = str(spec)
    held = holdout_fraction(data)
    if data is not None and held and spec in (str(data.valid), str(data.train)):
        keep_held = spec == str(data.valid)
        for i, item in enumerate(_rows(str(data.train), data)):
            if _held_out(i, held) == keep_held:
                yield item
        return
    if data is not None and spec == str(data.valid) and is_split_of_train(spec, data):
        base = dataset_spec(str(data.train), data)
        yield from _dataset_rows(DatasetSpec(base.name, base.subset, spec))
        return
    yield from _rows(spec, data)


def holdout_fraction(data) -> float:
    """data.valid as a fraction of the train rows (0 when it names a source)."""
    valid = str(getattr(data, "valid", "") or "")
    if not _FRACTION.match(valid):
        return 0.0
    value = float(valid)
    if not 0 < value < 1:
        raise ForgeError(f"data.valid: {valid} - a held-out fraction is between 0 and 1 (e.g. 0.05)")
    return value


def _held_out(i: int, fraction: float) -> bool:
    return zlib.crc32(f"{HOLDOUT_SEED}:{i}".encode()) / 2**32 < fraction


def is_split_of_train(valid: str, data) -> bool:
    """data.valid is a split name (no path of that name exists) and data.train is a dataset."""
    return (bool(valid) and "/" not in valid and not Path(valid).exists() and bool(str(data.train))
            and is_dataset(str(data.train)))


def is_dataset(spec: str) -> bool:
    """A Hub id (no such local path) or a dataset repo directory (`:subset@split` after it or not): what
    datasets.load_dataset reads."""
    path = Path(spec)
    if path.exists():
        return path.is_dir() and _is_repo_dir(path)
    name = Path(dataset_spec(spec).name)
    return bool(_HUB_ID.match(spec)) or (name.is_dir() and _is_repo_dir(name))


def dataset_spec(spec: str, data=None) -> DatasetSpec:
    """`org/name:subset@split` (or a directory) -> its name, subset and split (the spec's, else data.subset /
    data.split, else the train split)."""
    name, subset, split = spec, None, None
    if not Path(spec).exists():
        name, _, split = spec.partition("@")
        name, _, subset = name.partition(":")
    subset = subset or (getattr(data, "subset", "") or None)
    split = split or (getattr(data, "split", "") or "train")
    return DatasetSpec(name, subset, split)


def _rows(spec: str, data):
    path = Path(spec)
    if not spec:
        raise ForgeError("no data source given")
    if not path.exists():
        ds = dataset_spec(spec, data)  # `org/name:subset@split`, or a local repo dir with them
        if _HUB_ID.match(spec) or (Path(ds.name).is_dir() and _is_repo_dir(Path(ds.name))):
            yield from _dataset_rows(ds)
            return
        raise ForgeError(f"{path}: data file or directory not found (nor a Hub dataset id like org/name)")
    if path.is_file():
        yield from _file_rows(path)
    elif _is_save_to_disk(path):
        yield from _save_to_disk_rows(path)
    elif _is_repo_dir(path):
        yield from _dataset_rows(dataset_spec(spec, data))
    else:
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise ForgeError(f"{path}: directory has no .jsonl files and is not a dataset (a README.md with "
                             "configs, parquet/json/csv shards, or a `datasets.save_to_disk` directory)")
        for file in files:
            yield from _jsonl_rows(file)


# ---------------------------------------------------------------- files


def _file_rows(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".json" and _starts_with(path, b"["):
        yield from _json_array_rows(path)
    else:
        yield from _jsonl_rows(path)


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(prefix)


def _jsonl_rows(file: Path):
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ForgeError(f"{file}: cannot read ({e.strerror})") from None
    if not data.strip():
        raise ForgeError(located(file, None, "empty file: no rows"))
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
        data = data[3:]
    # split on \n only: str.splitlines would also split on \x1c, \u2028... and shift line numbers
    for n, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            yield str(file), n, parse_line(raw)


def parse_line(raw: bytes) -> dict | RowProblem:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowProblem(f"not valid UTF-8 (byte {e.start + 1})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return RowProblem(f"not valid JSON ({e.msg} at column {e.colno})")
    except (ValueError, RecursionError) as e:  # int digit limit, absurd nesting
        return RowProblem(f"not valid JSON ({type(e).__name__})")
    if not isinstance(row, dict):
        return RowProblem(f"expected a JSON object like {{\"messages\": [...]}}, got {_json_type(row)}")
    return row


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _json_array_rows(path: Path):
    try:
        rows = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ForgeError(located(path, None, f"not a valid JSON array ({e})")) from None
    if not isinstance(rows, list) or not rows:
        raise ForgeError(located(path, None, "expected a non-empty JSON array of row objects"))
    for i, row in enumerate(rows, 1):
        yield str(path), f"row {i}", row if isinstance(row, dict) else RowProblem(
            f"expected a JSON object like {{\"messages\": [...]}}, got {_json_type(row)}")


def _csv_rows(path: Path):
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ForgeError(located(path, None, "empty CSV: no header row"))
            for row in reader:
                if None in row:  # more cells than the header has names
                    yield str(path), reader.line_num, RowProblem(
                        f"{len(reader.fieldnames) + len(row[None])} cells, the header names {len(reader.fieldnames)}")
                else:
                    yield str(path), reader.line_num, dict(row)
    except UnicodeDecodeError as e:
        raise ForgeError(located(path, None, f"not valid UTF-8 ({e.reason})")) from None
    except csv.Error as e:
        raise ForgeError(located(path, None, f"not valid CSV ({e})")) from None


def _parquet_rows(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ForgeError(f"{path}: reading parquet needs pyarrow (pip install 'forge-tune[data]')") from None
    try:
        table = pq.ParquetFile(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
        raise ForgeError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    n = 0
    for batch in table.iter_batches(batch_size=BATCH_ROWS):
        for row in batch.to_pylist():
            n += 1
            yield str(path), f"row {n}", row


# ---------------------------------------------------------------- datasets


def _is_save_to_disk(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _is_repo_dir(path: Path) -> bool:
    """A dataset repo as the Hub stores it: a README.md whose YAML header has `configs:`, or data shards."""
    readme = path / "README.md"
    if readme.is_file() and re.search(r"^configs:", readme.read_text(errors="replace").split("\n---", 1)[0], re.MULTILINE):
        return True
    return any(p.suffix in (".parquet", ".csv", ".json") for p in path.rglob("*") if p.is_file()) and \
        not any(path.rglob("*.jsonl"))


def _datasets():
    try:
        import datasets  # lazy: an optional dependency, and slow to import
    except ImportError:
        raise ForgeError("reading a dataset repo or a Hub dataset needs the datasets package "
                         "(pip install 'forge-tune[data]')") from None
    return datasets


def _save_to_disk_rows(path: Path):
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable directory
        raise ForgeError(f"{path}: cannot load the datasets directory ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" not in ds and len(splits) != 1:
            raise ForgeError(f"{path}: a DatasetDict with splits {splits} and no 'train'; "
                             f"point to one split, e.g. {path / splits[0]}")
        ds = ds["train"] if "train" in ds else ds[splits[0]]
    for i, row in enumerate(ds):
        yield str(path), f"row {i + 1}", dict(row)


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _dataset_rows(spec: DatasetSpec):
    """datasets.load_dataset(name, subset, split=split): the Hub's cache, or a local repo dir; never remote code."""
    datasets = _datasets()
    local = Path(spec.name).is_dir()
    try:
        ds = datasets.load_dataset(spec.name, spec.subset, split=spec.split)
    except ValueError as e:  # an unknown split or subset: the message lists the ones there are
        raise ForgeError(f"{spec.where}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - not found, offline, unreadable: one line that says which
        if not local and offline():
            raise ForgeError(f"{spec.name}: not in the local datasets cache and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE "
                             "is set; load it once online (or unset them), or pass a local file") from None
        what = "a dataset directory datasets cannot read" if local else "cannot be loaded from the Hub"
        raise ForgeError(f"{spec.where}: {what} ({type(e).__name__}: {_first_line(e)})") from None
    for i, row in enumerate(ds):
        yield spec.where, f"row {i + 1}", dict(row)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
