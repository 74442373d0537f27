"""The paper's ten tasks (``superglue10``) from the Hugging Face hub, or from a local mirror.

cb, rte, copa, wic, wsc.fixed, boolq, multirc (``aps/super_glue``), winogrande
(``allenai/winogrande``, ``winogrande_xl``), story_cloze (``LSDSem/story_cloze``, 2016:
it has no train split, so its validation split is the training pool) and hellaswag
(``Rowan/hellaswag``). Each task is read in its hub schema; multiple-choice tasks list
their options in the prompt and score the option letters. Hub test splits have hidden
labels, so validation and test are both drawn from the hub's held-out split.

Where the hub is unreachable, ``tasks.hub_mirror=DIR`` reads the same schema from
``DIR/<task>/<hub split>.jsonl`` (e.g. ``DIR/cb/train.jsonl``, ``DIR/cb/validation.jsonl``)
through the same conversion, labelling and splitting code.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import datasets

from jax_ensemble.data.local import load_files
from jax_ensemble.data.task import TaskSpec
from jax_ensemble.errors import DataError
from jax_ensemble.storage.packages import cache_dir

_YES_NO = {"class_names": ("no", "yes"), "label_words": (" No", " Yes"), "label_values": (0, 1)}
_AB = {"class_names": ("A", "B"), "label_words": (" A", " B")}
_STANDARD_POOLS = {"train": "train", "heldout": "validation"}


@dataclasses.dataclass(frozen=True)
class HubTask:
    """A spec plus its hub dataset: ``path``, ``config`` and ``{our pool: hub split}``."""

    spec: TaskSpec
    path: str
    config: str | None
    pools: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(_STANDARD_POOLS))


def _superglue(name: str, template: str, kind: str, **labels) -> HubTask:
    return HubTask(
        TaskSpec(name=name, template=template, kind=kind, source=f"aps/super_glue ({name})",
                 license="see the SuperGLUE task's license", **labels),
        "aps/super_glue", name,
    )


_TASKS = (
    _superglue("cb", "{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:", "nli",
               class_names=("entailment", "contradiction", "neutral"),
               label_words=(" True", " False", " Neither"), label_values=(0, 1, 2)),
    _superglue("rte", "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", "nli",
               class_names=("entailment", "not_entailment"), label_words=(" True", " False"), label_values=(0, 1)),
    _superglue("copa", "{premise} What was the {question}?\nA) {choice1}\nB) {choice2}\nAnswer:",
               "commonsense", label_values=(0, 1), **_AB),
    _superglue("wic", "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nIs the word '{word}' used with the "
               "same meaning in both sentences? Yes or No?\nAnswer:", "word sense", **_YES_NO),
    _superglue("wsc.fixed", "{text}\nIn the passage above, does the pronoun '{span2_text}' refer to "
               "'{span1_text}'? Yes or No?\nAnswer:", "coreference", **_YES_NO),
    _superglue("boolq", "{passage}\nQuestion: {question}?\nAnswer (Yes or No):", "reading comprehension",
               **_YES_NO),
    _superglue("multirc", "{paragraph}\nQuestion: {question}\nIs the answer \"{answer}\" correct? Yes or No?"
               "\nAnswer:", "reading comprehension", **_YES_NO),
    HubTask(
        TaskSpec(name="winogrande", kind="coreference", label_field="answer", label_values=("1", "2"),
                 template="{sentence}\nIn the sentence above, what does _ stand for?\nA) {option1}\nB) {option2}"
                          "\nAnswer:",
                 source="allenai/winogrande (winogrande_xl)", license="CC-BY", **_AB),
        "allenai/winogrande", "winogrande_xl",
    ),
    HubTask(
        TaskSpec(name="story_cloze", kind="commonsense", label_field="answer_right_ending", label_values=(1, 2),
                 template="{input_sentence_1} {input_sentence_2} {input_sentence_3} {input_sentence_4}\n"
                          "Which ending is right?\nA) {sentence_quiz1}\nB) {sentence_quiz2}\nAnswer:",
                 source="LSDSem/story_cloze (2016)", license="see the Story Cloze Test terms", **_AB),
        "LSDSem/story_cloze", "2016", {"train": "validation", "heldout": "test"},
    ),
    HubTask(
        TaskSpec(name="hellaswag", kind="commonsense", label_values=("0", "1", "2", "3"),
                 class_names=("A", "B", "C", "D"), label_words=(" A", " B", " C", " D"),
                 template="{ctx}\nWhich continuation is most likely?\nA) {endings[0]}\nB) {endings[1]}\n"
                          "C) {endings[2]}\nD) {endings[3]}\nAnswer:",
                 source="Rowan/hellaswag", license="MIT"),
        "Rowan/hellaswag", None,
    ),
)

HUB_TASKS: dict[str, HubTask] = {t.spec.name: t for t in _TASKS}


def hub_spec_and_pools(name: str, mirror: str = "") -> tuple[TaskSpec, dict[str, datasets.Dataset]]:
    """The spec and ``{"train": ..., "heldout": ...}`` pools of a hub task (from ``mirror`` if set)."""
    task = HUB_TASKS[name]
    if mirror:
        files = {pool: Path(mirror).expanduser() / name / f"{split}.jsonl" for pool, split in task.pools.items()}
        spec = dataclasses.replace(task.spec, provenance={"mirror": str(Path(mirror).resolve())})
        return spec, load_files(files)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    pools = {}
    for pool, split in task.pools.items():
        try:
            pools[pool] = datasets.load_dataset(task.path, task.config, split=split,
                                                cache_dir=str(cache_dir() / "datasets"))
        except Exception as e:  # hub, network and builder errors come in many types
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(
                f"could not load {task.path!r} ({task.config or 'default'}, {split}) for task {name!r} from the "
                f"Hugging Face hub ({type(e).__name__}: {reason[:160]}); where the hub is unreachable, set "
                f"tasks.hub_mirror=DIR with DIR/{name}/{split}.jsonl in the hub's schema"
            ) from None
    spec = dataclasses.replace(task.spec, provenance={"hub": task.path, "config": task.config or ""})
    return spec, pools
