"""``TaskSpec`` (how a task reads and renders) and ``Task`` (a spec with its three splits).

A task is K-way classification of a rendered prompt: the model's next-token logits after
the prompt, restricted to the first token of each of the K label words (the verbalizer),
score the classes. Multiple-choice tasks list their options in the prompt (``A) …``,
``B) …``) and use the option letters as label words, so every task has one fixed
verbalizer. Multi-token label words are scored by their first token only (the convention
of :mod:`jax_ensemble.models.classification`); the first tokens must differ within a task.

Rows of a task's datasets keep the source's own fields (used by ``template``, a Python
format string such as ``"Review: {text}\\nSentiment:"``) plus an int ``label`` column:
the class index, mapped from the raw ``label_field`` value through ``label_values``.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Mapping

import datasets

from jax_ensemble.errors import DataError

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How a task's examples are labelled and rendered.

    name: task name (unique within a suite).
    template: ``str.format`` template over the row's fields; the answer follows it.
    class_names: human-readable class names, in class-index order.
    label_words: the text scored for each class (normally with a leading space).
    label_field / label_values: the raw label column and the raw value of each class.
    kind: what the task tests (sentiment, nli, logic, ...), for listings.
    source, license, provenance: where the data comes from and under which terms.
    split_salt: salts the seeded split (default: the name); tasks built from the same rows
      with the same salt get the same train / validation / test rows.
    """

    name: str
    template: str
    class_names: tuple[str, ...]
    label_words: tuple[str, ...]
    label_field: str = "label"
    label_values: tuple[Any, ...] = ()
    kind: str = ""
    description: str = ""
    source: str = ""
    license: str = ""
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    split_salt: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise DataError("a task spec has an empty name")
        k = len(self.class_names)
        if k < 2:
            raise DataError(f"task {self.name!r} needs at least 2 classes, has {k}")
        if len(self.label_words) != k or (self.label_values and len(self.label_values) != k):
            raise DataError(
                f"task {self.name!r}: {k} classes but {len(self.label_words)} label words"
                f" and {len(self.label_values)} label values"
            )
        if len(set(self.label_words)) != k:
            raise DataError(f"task {self.name!r}: label words {list(self.label_words)} are not distinct")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as e:
            raise DataError(f"task {self.name!r}: template is not a valid format string ({e})") from None
        if not self.template.strip() or any(not f for f in fields):
            raise DataError(f"task {self.name!r}: template must be non-empty and name its fields, e.g. {{text}}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def raw_label_values(self) -> tuple[Any, ...]:
        """Raw label value of each class (the class names unless ``label_values`` is set)."""
        return self.label_values or self.class_names

    def template_fields(self) -> list[str]:
        """Top-level row fields the template reads (``{endings[0]}`` reads ``endings``)."""
        names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
        return sorted({n.split(".")[0].split("[")[0] for n in names})


@dataclasses.dataclass(frozen=True)
class Task:
    """A spec with its train / validation / test ``datasets.Dataset`` splits (int ``label``);
    ``available``: labelled examples the source had before splitting."""

    spec: TaskSpec
    splits: Mapping[str, datasets.Dataset]
    available: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def split(self, name: str) -> datasets.Dataset:
        if name not in self.splits:
            raise DataError(f"task {self.name!r} has no split {name!r}; splits: {', '.join(self.splits)}")
        return self.splits[name]

    def summary(self) -> dict[str, Any]:
        """JSON-able listing: name, kind, classes, split sizes, available examples, source, license, provenance."""
        return {
            "name": self.name,
            "kind": self.spec.kind,
            "num_classes": self.num_classes,
            "classes": list(self.spec.class_names),
            "label_words": list(self.spec.label_words),
            **{s: len(self.splits[s]) for s in SPLITS},
            "available": self.available,
            "source": self.spec.source,
            "license": self.spec.license,
            "provenance": dict(self.spec.provenance),
        }


def render_prompt(spec: TaskSpec, row: Mapping[str, Any]) -> str:
    """The prompt text of one example (the answer's label word follows it)."""
    try:
        return spec.template.format(**row)
    except (KeyError, IndexError, AttributeError) as e:
        raise DataError(
            f"task {spec.name!r}: template field {e} is missing from the data (fields: {', '.join(sorted(row))})"
        ) from None


def with_class_labels(spec: TaskSpec, data: datasets.Dataset) -> datasets.Dataset:
    """``data`` with an int ``label`` column mapped from ``spec.label_field`` via the raw label values.

    Raises DataError when the label field or a template field is missing, or a raw label is
    not one of the task's label values."""
    missing = [f for f in [spec.label_field, *spec.template_fields()] if f not in data.column_names]
    if missing:
        raise DataError(
            f"task {spec.name!r}: field {missing[0]!r} is missing from the data (fields: {', '.join(data.column_names)})"
        )
    index = {_label_key(v): i for i, v in enumerate(spec.raw_label_values)}
    raw = data[spec.label_field]
    labels = []
    for row, value in enumerate(raw):
        if _label_key(value) not in index:
            raise DataError(
                f"task {spec.name!r}: row {row} has label {value!r}, not one of "
                f"{list(spec.raw_label_values)} (the task's verbalizer)"
            )
        labels.append(index[_label_key(value)])
    if "label" in data.column_names:
        data = data.remove_columns("label")
    return data.add_column("label", labels)


def _label_key(value: Any) -> Any:
    """Compare labels by value whatever the file type gave (1, 1.0, "1" stay distinct from "one")."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
