"""LoRA training step: throughput and peak memory for int8 / bf16 / f32 bases, and against PyTorch.

Each row is a fresh process that loads SmolLM2-135M-Instruct (registry GGUF), attaches
LoRA as in the default config (rank 4, alpha 32 on q/k/v; B = 0), and
times the jitted train step of :mod:`jax_ensemble.training.engine` (label-word cross-entropy,
clip + AdamW on the LoRA parameters only) on one fixed batch of BATCH × LENGTH random
tokens (2 label words, answer at the last position): ``WARMUP`` untimed steps (compile),
then ``STEPS`` timed ones. Peak memory is the process's peak RSS (``ru_maxrss``: loading
included).

The peer is transformers' PyTorch ``LlamaForCausalLM`` loaded from the same GGUF in
float32 (the same dequantized weights), with LoRA written by hand on its q/k/v
``nn.Linear`` modules (A ~ U(±1/√in), B = 0, same scaling), the same loss on the same batch and
``torch.optim.AdamW`` on the LoRA parameters, eager, with ``torch.set_num_threads(cpu
count)``. Both step-0 losses are reported: they must agree (same weights, same batch).

    .venv/bin/python benchmarks/training.py [--json] [--steps 5]

``jax_over_torch_step_throughput`` compares the float32 bases (like for like);
``jax_int8_over_torch_step_throughput`` the default int8 base against torch float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

MODEL = "smollm2-135m"
BATCH, LENGTH, LABEL_IDS, WARMUP = 8, 64, (28, 29), 2


def _batch(vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(100, vocab_size, size=(BATCH, LENGTH)).astype(np.int32),
        "attention_mask": np.ones((BATCH, LENGTH), np.int32),
        "answer_position": np.full(BATCH, LENGTH - 1, np.int32),
        "label_token_ids": np.tile(np.asarray(LABEL_IDS, np.int32), (BATCH, 1)),
        "label": rng.integers(0, 2, size=BATCH).astype(np.int32),
        "weight": np.ones(BATCH, np.float32),
    }


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_jax(base_dtype: str, steps: int) -> dict:
    import jax

    from jax_ensemble.config import LoRAConfig, TrainingConfig
    from jax_ensemble.models import load_pretrained
    from jax_ensemble.models.lora import apply_lora, split_lora
    from jax_ensemble.training.engine import init_state, make_optimizer, make_train_step
    from jax_ensemble.training.losses import classification_loss

    model, _ = load_pretrained(MODEL, base_dtype=base_dtype)
    apply_lora(model, LoRAConfig(), jax.random.key(0))
    vocab_size = model.config.vocab_size
    graphdef, lora, base = split_lora(model)
    del model
    config = TrainingConfig(learning_rate=1e-4, warmup_steps=0, max_steps=WARMUP + steps, batch_size=BATCH)
    optimizer = make_optimizer(config, config.max_steps)
    step = jax.jit(make_train_step(classification_loss(graphdef), optimizer, seed=0, dropout=False))
    batch = {k: jax.numpy.asarray(v[None]) for k, v in _batch(vocab_size).items()}
    state = init_state(lora, optimizer)
    losses = []
    for _ in range(WARMUP):
        state, metrics = step(state, base, batch)
        losses.append(float(metrics["loss"]))
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, base, batch)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    return {"examples_per_second": BATCH * steps / seconds, "seconds_per_step": seconds / steps,
            "step0_loss": losses[0], "peak_rss_mib": _peak_rss_mib()}


def measure_torch(steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jax_ensemble.config import LoRAConfig
    from jax_ensemble.models import resolve_model_files

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    path = resolve_model_files(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.requires_grad_(False)
    cfg = model.config
    lora_config = LoRAConfig()
    scaling = lora_config.alpha / lora_config.rank
    params = []
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            linear = getattr(layer.self_attn, name)
            bound = linear.in_features ** -0.5
            a = torch.nn.Parameter(torch.empty(linear.in_features, lora_config.rank).uniform_(-bound, bound))
            b = torch.nn.Parameter(torch.zeros(lora_config.rank, linear.out_features))
            params += [a, b]
            linear.register_forward_hook(lambda mod, inp, out, a=a, b=b: out + scaling * (inp[0] @ a) @ b)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    batch = {k: torch.from_numpy(v).long() for k, v in _batch(cfg.vocab_size).items() if k != "weight"}

    def train_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        h = hidden[torch.arange(BATCH), batch["answer_position"]]
        logits = torch.einsum("bd,bkd->bk", h, model.lm_head.weight[batch["label_token_ids"]])
        loss = torch.nn.functional.cross_entropy(logits, batch["label"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss)

    losses = [train_step() for _ in range(WARMUP)]
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    seconds = time.perf_counter() - start
    return {"examples_per_second": BATCH * steps / seconds, "seconds_per_step": seconds / steps,
            "step0_loss": losses[0], "peak_rss_mib": _peak_rss_mib()}


def _child(kind: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--steps", str(steps)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (after 2 compile/warm-up steps)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure_torch(args.steps) if args.child == "torch_f32" else measure_jax(args.child, args.steps)
        print(json.dumps(result))
        return
    rows = {kind: _child(kind, args.steps) for kind in ("int8", "bfloat16", "float32", "torch_f32")}
    summary = {
        "model": MODEL, "batch": BATCH, "length": LENGTH, "timed_steps": args.steps,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "rows": rows,
        "int8_peak_rss_over_f32": rows["int8"]["peak_rss_mib"] / rows["float32"]["peak_rss_mib"],
        "jax_over_torch_step_throughput": rows["float32"]["examples_per_second"] / rows["torch_f32"]["examples_per_second"],
        "jax_int8_over_torch_step_throughput": rows["int8"]["examples_per_second"] / rows["torch_f32"]["examples_per_second"],
        "int8_over_f32_step_throughput": rows["int8"]["examples_per_second"] / rows["float32"]["examples_per_second"],
        "step0_loss_abs_diff_jax_f32_vs_torch": abs(rows["float32"]["step0_loss"] - rows["torch_f32"]["step0_loss"]),
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(f"LoRA train step, {MODEL}, batch {BATCH} x {LENGTH} tokens, {args.steps} timed steps")
    print(f"  {'row':<10} {'examples/s':>11} {'s/step':>8} {'peak RSS MiB':>13} {'step-0 loss':>12}")
    for kind, r in rows.items():
        print(f"  {kind:<10} {r['examples_per_second']:>11.2f} {r['seconds_per_step']:>8.2f} "
              f"{r['peak_rss_mib']:>13.0f} {r['step0_loss']:>12.5f}")
    for key, value in summary.items():
        if isinstance(value, float):
            print(f"{key} = {value:.3f}")


if __name__ == "__main__":
    main()
