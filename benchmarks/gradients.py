"""Per-example projected gradients: our strategies vs a PyTorch reference of the official
approach, and vs one LoRA training step, on the same batch of the default model.

- ours: :func:`jax_ensemble.models.lora_gradients.batch_gradients` (int8 base by default, LoRA rank 4
  on q/k/v, gradients w.r.t. the B matrices, d = 400 seeded Rademacher projection
  regenerated block by block), for each requested strategy;
- reference (official approach): transformers' PyTorch ``LlamaForCausalLM`` loaded from
  the same GGUF in float32, a hand-written LoRA (same A, B = 0, same alpha / rank) on
  q/k/v, one forward + backward per example over all LoRA parameters (A and B), and a
  dense Rademacher matmul (the matrix is built before timing). Its B rows are our P's
  rows, so its projected gradients are compared with ours (``max_relative_difference``);
- the practical limit: one plain LoRA training step
  (:func:`jax_ensemble.training.engine.make_train_step`) on the same batch.

Every timing is the best of ``--repeats`` runs after one warm-up (compilation excluded).

    python benchmarks/gradients.py [--batch 8] [--length 64] [--strategies reverse,auto] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_batch(vocab: int, label_ids: list[int], batch: int, length: int) -> dict[str, np.ndarray]:
    """Random tokens, the answer at the last position, binary labels alternating."""
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(0, vocab, (batch, length)).astype(np.int32),
        "attention_mask": np.ones((batch, length), np.int32),
        "answer_position": np.full(batch, length - 1, np.int32),
        "label_token_ids": np.tile(np.array([label_ids], np.int32), (batch, 1)),
        "label": (np.arange(batch) % 2).astype(np.int32),
        "weight": np.ones(batch, np.float32),
    }


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_ensemble.config import LoRAConfig, TrainingConfig
    from jax_ensemble.core.projection import lift, make_projector
    from jax_ensemble.models import load_pretrained
    from jax_ensemble.models.lora import apply_lora, split_lora
    from jax_ensemble.models.lora_gradients import batch_gradients, lora_feature_split
    from jax_ensemble.training.engine import init_state, make_optimizer, make_train_step
    from jax_ensemble.training.losses import classification_loss

    lora_config = LoRAConfig()
    model, tokenizer = load_pretrained(args.model, base_dtype=args.base_dtype)
    apply_lora(model, lora_config, jax.random.key(0))
    graphdef, lora, base = split_lora(model)
    features, fixed, space = lora_feature_split(lora)
    projector = make_projector(features, args.dim, seed=0)
    label_ids = [tokenizer.encode(w, add_bos=False)[0] for w in (" Yes", " No")]
    batch = make_batch(model.config.vocab_size, label_ids, args.batch, args.length)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

    ours, grads = {}, {}
    for strategy in args.strategies.split(","):
        def call(strategy=strategy):
            f0, g = batch_gradients(features, fixed, base, jbatch, graphdef=graphdef, projector=projector,
                                    strategy=strategy, direction_chunk=args.direction_chunk)
            return jax.block_until_ready(g)
        seconds = best_time(call, args.repeats)
        grads[strategy] = np.asarray(call())
        ours[strategy] = {"seconds_per_batch": seconds, "examples_per_second": args.batch / seconds}

    optimizer = make_optimizer(TrainingConfig(), 100)
    train_step = jax.jit(make_train_step(classification_loss(graphdef), optimizer, seed=0, dropout=False))
    state = init_state(lora, optimizer)
    micro = {k: v[None] for k, v in jbatch.items()}
    train_seconds = best_time(lambda: jax.block_until_ready(train_step(state, base, micro)[1]), args.repeats)

    # dense P rows of the B leaves (ours, in leaf order k, q, v; each (L, r, out) row-major)
    dense_b = np.concatenate([np.asarray(x).reshape(args.dim, -1) for x in jax.tree.leaves(
        lift(projector, jnp.eye(args.dim)))], axis=1).T
    a_state = {path[-2]: np.asarray(var[...]) for path, var in nnx.to_flat_state(lora) if path[-1] == "lora_a"}
    reference = torch_reference(args, batch, a_state, dense_b, lora_config)
    first = args.strategies.split(",")[0]
    diff = float(np.max(np.abs(reference["grads"] - grads[first])) / np.max(np.abs(reference["grads"])))
    reverse = ours.get("reverse", ours[first])
    return {
        "model": args.model,
        "base_dtype": args.base_dtype,
        "batch": args.batch,
        "length": args.length,
        "dim": args.dim,
        "feature_space": space,
        "num_features": projector.num_params,
        "reference_num_params": reference["num_params"],
        "ours": ours,
        "torch_reference": {"seconds_per_batch": reference["seconds"], "threads": reference["threads"],
                            "examples_per_second": args.batch / reference["seconds"]},
        "train_step_seconds": train_seconds,
        "reverse_over_torch_reference": reverse["examples_per_second"] * reference["seconds"] / args.batch,
        "projected_grad_over_train_step": reverse["seconds_per_batch"] / train_seconds,
        "max_relative_difference_vs_reference": diff,
    }


def torch_reference(args, batch, a_state, dense_b, lora_config) -> dict:
    """The official approach in PyTorch: one backward per example, then a dense P matmul."""
    import torch
    from transformers import AutoModelForCausalLM

    from jax_ensemble.models import resolve_model_files

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    path = resolve_model_files(args.model)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    scaling = lora_config.alpha / lora_config.rank

    class LoRALinear(torch.nn.Module):
        def __init__(self, base, a):
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.tensor(a))
            self.b = torch.nn.Parameter(torch.zeros(a.shape[1], base.out_features))

        def forward(self, x):
            return self.base(x) + (x @ self.a @ self.b) * scaling

    modules = ("k_proj", "q_proj", "v_proj")  # our leaf order
    adapters = {m: [] for m in modules}
    for i, layer in enumerate(model.model.layers):
        for m in modules:
            wrapped = LoRALinear(getattr(layer.self_attn, m), a_state[m][i])
            setattr(layer.self_attn, m, wrapped)
            adapters[m].append(wrapped)
    b_params = [ad.b for m in modules for ad in adapters[m]]  # (k: layer 0..L-1), (q: ...), (v: ...)
    a_params = [ad.a for m in modules for ad in adapters[m]]
    num_b = sum(p.numel() for p in b_params)
    num_params = num_b + sum(p.numel() for p in a_params)
    generator = torch.Generator().manual_seed(0)
    p_a = (torch.randint(0, 2, (num_params - num_b, args.dim), generator=generator).float() * 2 - 1) / args.dim**0.5
    dense = torch.cat([torch.tensor(dense_b), p_a])  # (p, d): B rows are ours, A rows fresh ±1/√d

    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"])
    labels = batch["label"]
    tokens = batch["label_token_ids"]

    def per_example() -> np.ndarray:
        rows = []
        for i in range(args.batch):
            logits = model(ids[i:i + 1], attention_mask=mask[i:i + 1]).logits[0, batch["answer_position"][i]]
            z = logits[torch.tensor(tokens[i], dtype=torch.long)]
            f = z[labels[i]] - z[1 - labels[i]]
            grads = torch.autograd.grad(f, b_params + a_params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        return (torch.stack(rows) @ dense).numpy()

    seconds = best_time(per_example, args.repeats)
    return {"seconds": seconds, "grads": per_example(), "num_params": num_params, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--base-dtype", default="int8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dim", type=int, default=400)
    parser.add_argument("--strategies", default="reverse,auto", help="comma-separated: reverse, forward, auto")
    parser.add_argument("--direction-chunk", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads for the reference (0: torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    for name, r in result["ours"].items():
        print(f"ours {name:<8} {r['examples_per_second']:8.2f} examples/s ({r['seconds_per_batch']:.2f} s per batch)")
    ref = result["torch_reference"]
    print(f"torch ref {ref['examples_per_second']:8.2f} examples/s ({ref['seconds_per_batch']:.2f} s per batch)")
    print(f"train step {result['train_step_seconds']:.2f} s per batch")
    print(f"reverse_over_torch_reference = {result['reverse_over_torch_reference']:.2f}")
    print(f"projected_grad_over_train_step = {result['projected_grad_over_train_step']:.2f}")
    print(f"max relative difference vs reference = {result['max_relative_difference_vs_reference']:.2e}")


if __name__ == "__main__":
    main()
