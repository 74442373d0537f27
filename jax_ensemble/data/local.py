"""User tasks from local files: JSONL / JSON / CSV / Parquet plus a small YAML or JSON spec.

A spec file (paths relative to it)::

    name: my_sentiment
    template: "Review: {text}\\nSentiment:"   # str.format over the row's fields
    label_field: label                      # default: label
    label_words:                            # class name -> label word (order = class index)
      negative: " bad"
      positive: " good"
    label_values: [0, 1]                    # optional: raw label of each class (default: class names)
    data: reviews.jsonl                     # one pool, split three ways, or
    # data: {train: train.csv, heldout: dev.csv}   # train from one file, validation+test from the other
    kind: sentiment                         # optional: kind, description, source, license

Files are read with ``datasets.load_dataset`` (``json`` / ``csv`` / ``parquet`` builders,
Arrow cache under ``<cache>/datasets``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import datasets
import yaml

from jax_ensemble.data.task import TaskSpec
from jax_ensemble.errors import DataError, parse_error_location
from jax_ensemble.storage.digests import sha256_file
from jax_ensemble.storage.packages import cache_dir

SPEC_SUFFIXES = (".yaml", ".yml", ".json")
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_REQUIRED = ("name", "template", "label_words", "data")
_OPTIONAL = ("label_field", "label_values", "kind", "description", "source", "license", "split_salt")


def load_files(files: Mapping[str, Path]) -> dict[str, datasets.Dataset]:
    """``{pool: Dataset}`` from ``{pool: file}`` (format chosen by suffix)."""
    out = {}
    for pool, path in files.items():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"data file {path} must end in {', '.join(_BUILDERS)}")
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        if not path.read_bytes().strip():
            raise DataError(f"data file {path} is empty")
        if builder == "json":
            _check_json_rows(path)
        try:
            out[pool] = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=str(cache_dir() / "datasets")
            )
        except Exception as e:  # the builders raise many types for unreadable files
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"data file {path} cannot be read as {builder}: {reason[:200]}") from None
    return out


def _check_json_rows(path: Path) -> None:
    """DataError naming the file and the 1-based line of the first row that is not a JSON
    object (a .json file may also be one JSON array)."""
    text = path.read_text()
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, (list, dict)):
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"data file {path}, line {number}: not valid JSON ({getattr(e, 'msg', e)}, "
                            f"column {getattr(e, 'colno', '?')})") from None
        if not isinstance(row, dict):
            raise DataError(f"data file {path}, line {number}: each line must be a JSON object, got "
                            f"{type(row).__name__}")


def read_spec_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML/JSON spec file (DataError if unreadable or not a mapping)."""
    if not path.is_file():
        raise DataError(f"file {path} does not exist")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as e:
        raise DataError(f"{path} is not valid {path.suffix[1:].upper()}: {parse_error_location(e)}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a mapping at the top level")
    return data


def local_spec_and_pools(path: Path) -> tuple[TaskSpec, dict[str, datasets.Dataset]]:
    """Read a task spec file and its data files."""
    raw = read_spec_file(path)
    missing = [k for k in _REQUIRED if k not in raw]
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        problem = f"missing required key {missing[0]!r}" if missing else f"unknown key {unknown[0]!r}"
        raise DataError(f"task spec {path}: {problem} (required: {', '.join(_REQUIRED)}; "
                        f"optional: {', '.join(_OPTIONAL)})")
    words = raw["label_words"]
    if not isinstance(words, dict) or not all(isinstance(w, str) for w in words.values()):
        raise DataError(f"task spec {path}: label_words must map each class name to its label word")
    if not isinstance(raw.get("label_values", []), list):
        raise DataError(f"task spec {path}: label_values must be a list (the raw label of each class, in order)")
    data = raw["data"]
    files = {"all": data} if isinstance(data, str) else data
    if not isinstance(files, dict) or set(files) not in ({"all"}, {"train", "heldout"}):
        raise DataError(f"task spec {path}: data must be one file or {{train: FILE, heldout: FILE}}")
    files = {pool: (path.parent / f).resolve() for pool, f in files.items()}
    pools = load_files(files)
    spec = TaskSpec(
        name=str(raw["name"]),
        template=str(raw["template"]),
        class_names=tuple(str(c) for c in words),
        label_words=tuple(words.values()),
        label_field=str(raw.get("label_field", "label")),
        label_values=tuple(raw.get("label_values", ())),
        kind=str(raw.get("kind", "")),
        description=str(raw.get("description", "")),
        source=str(raw.get("source", f"local files ({path})")),
        license=str(raw.get("license", "unknown")),
        provenance={"spec": str(path.resolve()), **{f"{p}_sha256": sha256_file(f) for p, f in files.items()}},
    )
    return spec, pools
