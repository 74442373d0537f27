"""Capacity plan of a run, without weights: per-device memory, FLOPs and time of each stage.

``plan_run(config, devices=8, device=DEVICES["h100"])`` builds the config's model abstractly
(:func:`abstract_model`: ``nnx.eval_shape`` of its family's model with LoRA attached, the
architecture from :func:`~jax_ensemble.stages.architectures.architecture_of`), lays every
array out on the ``(data, fsdp, tensor)`` mesh with the partition rules
(:func:`~jax_ensemble.stages.accounting.device_bytes`), and prices each stage of the main job
(and of ``uq`` and ``validate-estimates``) with the formulas of
:mod:`jax_ensemble.stages.accounting`:

- memory per device = base weights + LoRA state (adapters, AdamW moments, best adapter; the
  gradient and its accumulator) + the batch + activations (the remat policy of
  ``scan_layers``) + the stage's own arrays (per-example gradients, a block of P, G);
- FLOPs from the analytical forward count (``forward_flops``; training 2× per step,
  gradients by the chosen strategy's cost model, :func:`~jax_ensemble.core.linearize.strategy_costs`);
- time = FLOPs / (devices · peak · efficiency).

Sizes are upper bounds: every task has ``tasks.*_size`` rows (fewer when a task is smaller)
padded to ``tasks.max_length`` tokens (batches are bucketed shorter when prompts are short);
groups are taken equal-sized (``clustering.num_groups``; with 0, the eigengap's choice is
unknown and ⌈√n⌉ is assumed); solvers run to their iteration caps. The stages that hold
their arrays on one device run there (the affinity solves); every other stage of the main
job runs on the mesh. The affinity solves run on device 0.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from jax_ensemble.config import Config, UQConfig
from jax_ensemble.core import solvers
from jax_ensemble.core.linearize import choose_strategy, strategy_costs
from jax_ensemble.data.hub import HUB_TASKS
from jax_ensemble.data.local import read_spec_file
from jax_ensemble.data.offline import OFFLINE_TASKS
from jax_ensemble.data.suites import suite_task_refs
from jax_ensemble.errors import ConfigError, DataError
from jax_ensemble.models.decoder import DecoderConfig
from jax_ensemble.models.families import Family
from jax_ensemble.models.lora import apply_lora, split_lora
from jax_ensemble.stages import accounting
from jax_ensemble.stages.architectures import architecture_of
from jax_ensemble.training.engine import adapter_training, init_state, make_optimizer, total_steps
from jax_ensemble.training.mesh import AXES, mesh_shape
from jax_ensemble.training.settings import TrainingConfig

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator: memory in bytes, dense peak FLOP/s by compute dtype (float32 at JAX's
    default matmul precision: TF32 on NVIDIA GPUs, one bf16 pass on TPUs), and the fraction
    of memory a JAX process gets by default (GPUs: XLA preallocates 75% unless
    ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says otherwise)."""

    name: str
    memory_bytes: int
    peak_flops: dict[str, float]
    usable_fraction: float = 1.0

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * self.usable_fraction)


DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM 80GB", int(79.6 * GIB), {"bfloat16": 989e12, "float32": 495e12}, 0.75),
    "h200": Device("NVIDIA H200 141GB", int(139.8 * GIB), {"bfloat16": 989e12, "float32": 495e12}, 0.75),
    "a100": Device("NVIDIA A100 SXM 80GB", int(79.2 * GIB), {"bfloat16": 312e12, "float32": 156e12}, 0.75),
    "v5e": Device("TPU v5e chip", 16 * GIB, {"bfloat16": 197e12, "float32": 197e12}),
    "v5p": Device("TPU v5p chip", 95 * GIB, {"bfloat16": 459e12, "float32": 459e12}),
    "v4": Device("TPU v4 chip", 32 * GIB, {"bfloat16": 275e12, "float32": 275e12}),
}
"""Vendor figures: memory as the runtime reports it (GPUs) or as specified (TPUs), dense
(not sparse) peak FLOP/s."""
DEFAULT_DEVICE = "h100"
DEFAULT_EFFICIENCY = 0.35
"""Fraction of peak assumed for whole steps: XLA's int8 → bf16 gate_proj GEMM of Llama-3.1-8B
reached 485 of 989 TFLOP/s (0.49) on an H200 (benchmarks/RESULTS.md, kernels); attention,
norms, LoRA's small products and collectives run slower. An assumption, not a measurement
of a whole step."""

SOLVER_ITERATIONS = {name: inspect.signature(getattr(solvers, name)).parameters["max_iter"].default
                     for name in ("newton", "lbfgs")}
"""The solvers' iteration caps (``max_iter`` of ``core.solvers.newton`` / ``lbfgs``): the plan's upper bound."""


def task_classes(config: Config) -> list[int]:
    """Classes of each task of the suite, from the task specs (no data is read)."""
    counts = []
    for ref in suite_task_refs(config.tasks.suite):
        if ref in OFFLINE_TASKS:
            counts.append(OFFLINE_TASKS[ref].spec.num_classes)
        elif ref in HUB_TASKS:
            counts.append(HUB_TASKS[ref].spec.num_classes)
        else:
            words = read_spec_file(Path(ref).expanduser()).get("label_words")
            if not isinstance(words, dict) or len(words) < 2:
                raise DataError(f"task spec {ref}: label_words must map each class name to its label word")
            counts.append(len(words))
    return counts


def abstract_model(family: Family, architecture: DecoderConfig, config: Config) -> nnx.Module:
    """The config's model with LoRA attached, as shapes only (``nnx.eval_shape``: no weight exists)."""

    def build() -> nnx.Module:
        model = family.model_class(architecture, base_dtype=config.model.base_dtype,
                                   compute_dtype=config.model.compute_dtype, rngs=nnx.Rngs(0))
        apply_lora(model, config.lora, jax.random.key(config.seed))
        return model

    return nnx.eval_shape(build)


def batch_shapes(rows: int, length: int, choices: int, leading: tuple[int, ...] = ()) -> dict[str, Any]:
    """ShapeDtypeStructs of a training batch (``core.batch``): ids and mask (…, rows, T), the
    answer position, label and weight (…, rows), the label token ids (…, rows, K)."""
    s = jax.ShapeDtypeStruct
    lead = tuple(leading) + (rows,)
    return {"input_ids": s(lead + (length,), jnp.int32), "attention_mask": s(lead + (length,), jnp.int32),
            "answer_position": s(lead, jnp.int32), "label_token_ids": s(lead + (choices,), jnp.int32),
            "label": s(lead, jnp.int32), "weight": s(lead, jnp.float32)}


class Planner:
    """Prices stages of one config on one mesh (see module doc); every method returns a stage
    dict: ``memory`` (bytes per device by part), ``flops``, ``runs`` (where)."""

    def __init__(self, config: Config, model: nnx.Module, mesh: AbstractMesh, classes: list[int]):
        self.config = config
        self.mesh = mesh
        self.arch = model.config
        self.classes = classes
        _, self.lora, self.base = split_lora(model)
        self.widths = accounting.layer_widths(model, mesh)
        self.dtype_bytes = jnp.dtype(config.model.compute_dtype).itemsize
        self.length = config.tasks.max_length
        self.weights = accounting.device_bytes(self.base, mesh)

    def rows(self, rows: int) -> tuple[int, int]:
        """(rows on one device, rows one layer is computed on): a batch split over (data, fsdp),
        gathered back over ``fsdp`` inside a layer (accounting module doc); a batch the axes do
        not divide stays whole."""
        local = accounting.batch_rows_per_device(rows, self.mesh)
        return local, local * self.mesh.shape["fsdp"] if local != rows else rows

    def forward(self, rows: int, choices: int) -> float:
        return accounting.forward_flops(self.arch, rows, self.length, choices)

    def training_step_memory(self, training: TrainingConfig, members: int = 1) -> dict[str, int]:
        """One optimizer step of ``members`` stacked adapters (engine.train's jitted step): the
        training state in and out (the step does not donate it), the gradient and its
        accumulator, the batch of ``grad_accum_steps`` micro-batches, one micro-batch's activations."""
        optimizer = make_optimizer(training, 1)
        if members > 1:
            lora = jax.tree.map(lambda x: jax.ShapeDtypeStruct((members, *x.shape), x.dtype), self.lora)
            state = jax.eval_shape(jax.vmap(lambda one: init_state(one, optimizer)), lora)
        else:
            lora, state = self.lora, jax.eval_shape(lambda one: init_state(one, optimizer), self.lora)
        leading = int(members > 1)
        micro = training.micro_batch_size
        batch = batch_shapes(micro, self.length, max(self.classes), (training.grad_accum_steps,) + (members,) * leading)
        rows, working = self.rows(micro)
        return {
            "weights": self.weights,
            "lora_and_optimizer": 2 * accounting.device_bytes(state, self.mesh, leading=leading)
            + 2 * accounting.device_bytes(lora, self.mesh, leading=leading),
            "batch": accounting.batch_bytes(batch, self.mesh, leading=1 + leading),
            "activations": members * accounting.training_activation_bytes(
                self.widths, rows, self.length, self.dtype_bytes, working),
        }

    def inference_memory(self, members: int, rows: int) -> dict[str, int]:
        """One stacked forward of ``members`` adapters over ``rows`` rows (stacked_label_logits)."""
        lora = jax.tree.map(lambda x: jax.ShapeDtypeStruct((members, *x.shape), x.dtype), self.lora)
        local, working = self.rows(rows)
        return {
            "weights": self.weights,
            "lora_and_optimizer": accounting.device_bytes(lora, self.mesh, leading=1),
            "batch": accounting.batch_bytes(batch_shapes(rows, self.length, max(self.classes)), self.mesh),
            "activations": members * accounting.inference_activation_bytes(
                self.widths, local, self.length, self.dtype_bytes, working),
        }

    def training(self, name: str, rows: int, validation_rows: int, training: TrainingConfig,
                 members: int = 1) -> dict[str, Any]:
        """An adapter (or ``members`` stacked) trained on ``rows`` rows, validated on ``validation_rows``."""
        steps = total_steps(training, rows)
        evaluations = -(-steps // training.eval_every)
        per_step = accounting.BACKWARD_FACTOR * self.forward(training.batch_size, max(self.classes))
        flops = members * (steps * per_step + evaluations * self.forward(validation_rows, max(self.classes)))
        memory = max(self.training_step_memory(training, members),
                     self.inference_memory(members, training.eval_batch_size), key=lambda m: sum(m.values()))
        return {"name": name, "memory": memory, "flops": flops, "steps": steps, "rows": rows}

    def gradients(self, train_rows: int, validation_rows: int) -> dict[str, Any]:
        """Per-example projected gradients of every train and validation row (gradients.batch_size
        rows a batch), by the strategy ``auto`` would choose for a batch."""
        gc = self.config.gradients
        features = [x for path, x in jax.tree_util.tree_flatten_with_path(self.lora)[0]
                    if "lora_b" in jax.tree_util.keystr(path)]
        p = sum(math.prod(x.shape) for x in features)
        outputs = max(1 if k == 2 else k - 1 for k in self.classes)  # classification_output's width
        costs = strategy_costs(num_params=p, dim=gc.dim, batch_size=gc.batch_size, outputs=outputs,
                               forward_flops=self.forward(gc.batch_size, max(self.classes)),
                               direction_chunk=min(gc.direction_chunk, gc.dim))
        strategy = gc.strategy if gc.strategy != "auto" else choose_strategy(costs, gc.memory_budget_mb * 2**20)
        rows, working = self.rows(gc.batch_size)
        if strategy == "reverse":
            extra = {"per_example_gradients": 4 * rows * outputs * p,
                     "activations": accounting.training_activation_bytes(
                         self.widths, rows, self.length, self.dtype_bytes, working)}
        else:  # jax.linearize keeps the saved residuals; each of c directions runs a tangent forward
            chunk = min(gc.direction_chunk, gc.dim)
            extra = {"per_example_gradients": 4 * chunk * p,
                     "activations": accounting.saved_residual_bytes(self.widths, rows, self.length, self.dtype_bytes)
                     + chunk * accounting.inference_activation_bytes(
                         self.widths, rows, self.length, self.dtype_bytes, working)}
        memory = {"weights": self.weights, "lora_and_optimizer": accounting.device_bytes(self.lora, self.mesh),
                  "batch": accounting.batch_bytes(batch_shapes(gc.batch_size, self.length, max(self.classes)),
                                                  self.mesh),
                  **extra,
                  "projection": 4 * min(gc.block_rows, max(math.prod(x.shape) for x in features)) * gc.dim
                  + 4 * rows * outputs * gc.dim}
        batches = -(-(train_rows + validation_rows) // gc.batch_size)
        return {"name": "gradients", "memory": memory, "flops": batches * costs[strategy]["flops"],
                "strategy": strategy, "features": p}


def _inference_stage(name: str, planner: Planner, members: int, flops: float) -> dict[str, Any]:
    """A stacked-inference stage over ``tasks.batch_size`` rows a batch, on the mesh."""
    rows = planner.config.tasks.batch_size
    return {"name": name, "memory": planner.inference_memory(members, rows), "flops": flops}


def plan_run(config: Config, *, devices: int, device: Device, efficiency: float = DEFAULT_EFFICIENCY,
             family: Family | None = None, architecture: DecoderConfig | None = None,
             validate_subsets: int = 5) -> dict[str, Any]:
    """The capacity plan of ``config`` on ``devices`` × ``device`` (module doc). ``family`` and
    ``architecture`` default to :func:`architecture_of` ``(config.model.source)``.
    ConfigError when the mesh does not fit the device count or a number is out of range."""
    if devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {devices}")
    if not 0.0 < efficiency <= 1.0:
        raise ConfigError(f"--efficiency must be in (0, 1], got {efficiency}")
    if family is None or architecture is None:
        family, architecture = architecture_of(config.model.source)
    shape = mesh_shape(config.mesh, devices)
    mesh = AbstractMesh(shape, AXES)
    model = abstract_model(family, architecture, config)
    classes = task_classes(config)
    planner = Planner(config, model, mesh, classes)
    single = Planner(config, model, AbstractMesh((1, 1, 1), AXES), classes)
    n = len(classes)
    tc = config.tasks
    train_rows, val_rows, test_rows = n * tc.train_size, n * tc.validation_size, n * tc.test_size
    groups = config.clustering.num_groups or math.ceil(math.sqrt(n))
    group_train, group_val = -(-train_rows // groups), -(-val_rows // groups)
    job = adapter_training(config.training, train_rows)
    boosts = config.ensemble.boosting_steps
    forward = planner.forward

    stages: list[dict[str, Any]] = [{"name": "model", "memory": {"weights": planner.weights}, "flops": 0.0}]
    stages.append(planner.gradients(train_rows, val_rows))
    ac = config.affinity
    outputs = max(1 if k == 2 else k for k in classes)
    solver = solvers.resolve_method(ac.solver, config.gradients.dim)
    subset_tasks = max(2, math.ceil(ac.subset_fraction * n))
    iterations = SOLVER_ITERATIONS[solver]
    dim = outputs * config.gradients.dim
    solve_rows = subset_tasks * tc.train_size if solver == "newton" else train_rows
    stages.append({"name": "affinity", "runs": "device 0", "solver": solver, "iterations": iterations,
                   "flops": accounting.affinity_solve_flops(solver, [subset_tasks * tc.train_size] * ac.num_subsets,
                                                            train_rows, outputs, config.gradients.dim, iterations),
                   "memory": {"projected_gradients": 4 * (train_rows + val_rows) * dim,
                              "solver": 4 * ac.num_subsets * (solve_rows * dim
                                                              + (2 * dim * dim if solver == "newton" else 0))}})
    stages.append({"name": "grouping", "runs": "host", "flops": None, "memory": {"affinity": 8 * n * n},
                   "groups": groups, "groups_assumed": config.clustering.num_groups == 0})
    adapters = [("single", train_rows, val_rows)] + [(f"group-{g}", group_train, group_val) for g in range(groups)]
    if config.ensemble.random_groups:
        adapters += [(f"random-{g}", group_train, group_val) for g in range(groups)]
    stages += [planner.training(f"training {name}", rows, val, job) for name, rows, val in adapters]
    stages.append(_inference_stage("ensemble", planner, groups, groups * forward(val_rows, max(classes))))
    if boosts:
        learner = planner.training("boosting", group_train, group_val, job)
        logits = _inference_stage("boosting", planner, groups + 1,
                                  boosts * (groups + 1) * forward(train_rows + val_rows, max(classes)))
        stages.append({**logits, "flops": boosts * learner["flops"] + logits["flops"], "steps": learner["steps"],
                       "memory": max(learner["memory"], logits["memory"], key=lambda m: sum(m.values()))})
    members = groups + boosts + 1 if boosts else groups
    passes = 2 + members + (groups if config.ensemble.random_groups else 0)
    stages.append(_inference_stage("evaluation", planner, members, passes * forward(test_rows, max(classes))))

    uq = config.uq
    uq_rows = len(uq.in_distribution) * tc.train_size
    variants = 1 + (uq.weight_decay > 0) + (uq.kl_penalty > 0)
    uq_stage = planner.training("uq members", uq_rows, len(uq.in_distribution) * tc.validation_size,
                                config.training, members=uq.members)
    uq_stage["flops"] = variants * uq_stage["flops"] + planner.training(
        "mc dropout", uq_rows, 0, config.training)["flops"] + (variants + 1) * uq.members * forward(
        (len(uq.in_distribution) + len(uq.out_of_distribution)) * tc.test_size, max(classes))
    subset_rows = subset_tasks * tc.train_size
    validate = planner.training("validate-estimates", subset_rows, subset_tasks * tc.validation_size, job)
    validate["flops"] *= validate_subsets
    commands = [{**validate, "runs": "mesh", "command": "validate-estimates", "subsets": validate_subsets}]
    if uq != UQConfig():  # configured: the uq section differs from the defaults
        commands.insert(0, {**uq_stage, "runs": "mesh", "command": "uq", "variants": variants})

    peak = device.peak_flops[config.model.compute_dtype]
    capacity = device.usable_bytes

    def finish(stage: dict[str, Any]) -> dict[str, Any]:
        stage.setdefault("runs", "mesh")
        stage["memory_bytes"] = sum(stage["memory"].values())
        stage["fits"] = stage["memory_bytes"] <= capacity
        chips = devices if stage["runs"] == "mesh" else 1
        stage["seconds"] = None if stage["flops"] is None else stage["flops"] / (chips * peak * efficiency)
        return stage

    stages = [finish(s) for s in stages]
    commands = [finish(s) for s in commands]
    main = [s for s in stages if s["seconds"] is not None]
    return {
        "config": config.name,
        "model": {"source": config.model.source, "family": family.name, "architecture": dataclasses.asdict(architecture),
                  "base_dtype": config.model.base_dtype, "compute_dtype": config.model.compute_dtype,
                  "base_bytes": single.weights, "lora_params": sum(x.size for x in jax.tree.leaves(planner.lora))},
        "devices": devices,
        "device": {"name": device.name, "memory_bytes": device.memory_bytes, "usable_bytes": capacity,
                   "peak_flops": peak},
        "mesh": dict(zip(AXES, shape)),
        "efficiency": efficiency,
        "tasks": n, "rows": {"train": train_rows, "validation": val_rows, "test": test_rows},
        "max_length": tc.max_length,
        "stages": stages,
        "commands": commands,
        "total_seconds": sum(s["seconds"] for s in main),
        "all_fit": all(s["fits"] for s in stages),
    }


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "host"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a table: per stage, memory per device (GiB), whether it fits, TFLOPs and time."""
    d, m = plan["device"], plan["model"]
    lines = [
        f"plan for {plan['config']}: {m['source']} ({m['family']}, {m['base_dtype']} base "
        f"{_gib(m['base_bytes'])} GiB, {m['compute_dtype']} compute), {plan['tasks']} tasks, "
        f"{plan['rows']['train']}/{plan['rows']['validation']}/{plan['rows']['test']} rows, T <= {plan['max_length']}",
        f"devices: {plan['devices']} x {d['name']} ({_gib(d['usable_bytes'])} GiB usable of {_gib(d['memory_bytes'])}, "
        f"{d['peak_flops'] / 1e12:.0f} TFLOP/s peak), mesh data={plan['mesh']['data']} fsdp={plan['mesh']['fsdp']} "
        f"tensor={plan['mesh']['tensor']}, time at {plan['efficiency']:.0%} of peak",
        f"  {'stage':<22} {'runs':<9} {'GiB/device':>10} {'fits':>13} {'TFLOPs':>10} {'time':>9}",
    ]
    for stage in plan["stages"] + plan["commands"]:
        if stage is plan["commands"][0]:
            lines.append("  other commands (run separately):")
        flops = "" if stage["flops"] is None else f"{stage['flops'] / 1e12:,.0f}"
        lines.append(f"  {stage['name']:<22} {stage['runs']:<9} {_gib(stage['memory_bytes']):>10} "
                     f"{'fits' if stage['fits'] else 'does not fit':>13} {flops:>10} {_duration(stage['seconds']):>9}")
    lines.append(f"main job: {_duration(plan['total_seconds'])} on the mesh; "
                 + ("every stage fits" if plan["all_fit"] else "some stage does not fit"))
    return "\n".join(lines)
