"""A tiny random int8 Llama with LoRA and synthetic classification rows, for the training
and sharding tests (imported by in-process tests and by their subprocess scripts)."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from jax_ensemble.models import LlamaConfig, LlamaForCausalLM
from jax_ensemble.models.lora import LoRAConfig, apply_lora, split_lora

TINY = LlamaConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
)


@functools.cache
def tiny_split(base_dtype: str = "int8", dropout: float = 0.0, seed: int = 0):
    """(graphdef, lora_state, base_state) of a tiny model with LoRA (rank 4) on q/k/v.

    B is set to small random values so gradients with respect to A are non-zero too.
    Cached per process (building the model runs many small eager ops): never mutate."""
    model = LlamaForCausalLM(TINY, base_dtype=base_dtype, rngs=nnx.Rngs(seed))
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=dropout), jax.random.key(seed + 1))
    graphdef, lora, base = split_lora(model)
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
    lora = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return graphdef, lora, base


def synthetic_table(rows: int, seq: int = 12, seed: int = 0, num_classes: int = 2) -> dict[str, np.ndarray]:
    """Rows whose label says which of the class marker tokens appears most; left-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, TINY.vocab_size, size=(rows, seq)).astype(np.int32)
    label = rng.integers(0, num_classes, size=rows).astype(np.int32)
    ids[np.arange(rows), rng.integers(2, seq, size=rows)] = 3 + label
    lengths = rng.integers(seq // 2, seq + 1, size=rows)
    mask = (np.arange(seq)[None, :] >= seq - lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "answer_position": np.full(rows, seq - 1, np.int32),
        "label_token_ids": np.tile(np.arange(3, 3 + num_classes, dtype=np.int32), (rows, 1)),
        "label": label,
        "weight": np.ones(rows, np.float32),
    }


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The scalars TensorBoard shows for a training run directory: tag → [(step, value)], read
    with TensorBoard's own event reader (which applies the purge markers written on resume)."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_tensorboard_matches_jsonl(run_dir) -> None:
    """Every scalar of metrics.jsonl appears in TensorBoard once per step, at float32 precision."""
    import json
    from pathlib import Path

    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    shown = tensorboard_scalars(run_dir)
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for name, value in r.items():
            if name == "step":
                continue
            values = value if isinstance(value, list) else [value]
            for member, v in enumerate(values):
                tag = f"{name}/member_{member}" if isinstance(value, list) else name
                expected.setdefault(tag, []).append((r["step"], v))
    assert shown.keys() == expected.keys()
    for tag, points in expected.items():
        assert [s for s, _ in shown[tag]] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in shown[tag]], [v for _, v in points], rtol=1e-6, err_msg=tag)
