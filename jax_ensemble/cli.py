"""Command line: ``jax-ensemble <command> ...``.

User errors (:class:`~jax_ensemble.errors.JaxEnsembleError`) print one line
``error: ...`` on stderr and exit with status 2; argparse usage errors also exit 2.
Machine-readable results go to stdout with ``--json``; progress bars and log records (the
standard :mod:`logging` module, logger ``jax_ensemble``; ``--log-level``) go to stderr, from
process 0 only in a multi-process run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from jax_ensemble.errors import ConfigError, JaxEnsembleError


def _check_count(option: str, value: int) -> None:
    """ConfigError unless a CLI count is at least 1 (checked before anything loads)."""
    if value < 1:
        raise ConfigError(f"{option} must be >= 1, got {value}")


def _cmd_generate(args: argparse.Namespace) -> int:
    from jax_ensemble.config import ModelConfig
    from jax_ensemble.models.generate import greedy_generate
    from jax_ensemble.models.loading import load_pretrained

    ModelConfig(source=args.model, base_dtype=args.base_dtype)
    _check_count("--max-new-tokens", args.max_new_tokens)
    model, tokenizer = load_pretrained(args.model, base_dtype=args.base_dtype)
    out = greedy_generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"model": args.model, "base_dtype": args.base_dtype, "prompt": out.prompt,
                          "completion": out.completion, "new_token_ids": out.new_ids}))
    else:
        print(out.prompt + out.completion)
    return 0


def _job_config(args: argparse.Namespace):
    """The command's config, after the checks that need no compute (run directory, sizes)."""
    from jax_ensemble.config import load_config
    from jax_ensemble.stages.preflight import check_before_compute

    config = load_config(args.config, args.overrides)
    check_before_compute(config)
    return config


def _cmd_run(args: argparse.Namespace) -> int:
    from jax_ensemble.pipeline import run

    run(_job_config(args))
    return 0


def _tasks_config(args: argparse.Namespace):
    """The config of a data/evaluate command (``--suite`` overrides ``tasks.suite``); quiets ``datasets``."""
    import datasets

    from jax_ensemble.config import load_config

    datasets.disable_progress_bars()
    overrides = list(args.overrides) + ([f"tasks.suite={args.suite}"] if getattr(args, "suite", None) else [])
    return load_config(args.config, overrides)


def _cmd_data_list(args: argparse.Namespace) -> int:
    from jax_ensemble.data import load_suite

    config = _tasks_config(args)
    summaries = [t.summary() for t in load_suite(config.tasks)]
    if args.json:
        print(json.dumps(summaries))
        return 0
    print(f"suite {config.tasks.suite}: {len(summaries)} tasks (train/validation/test examples per task)")
    for s in summaries:
        print(f"  {s['name']:<28} {s['kind']:<21} {s['num_classes']} classes  "
              f"{s['train']:>5} / {s['validation']:>4} / {s['test']:>4}  {s['license']}")
    return 0


def _cmd_data_show(args: argparse.Namespace) -> int:
    from jax_ensemble.data import load_task, render_prompt

    _check_count("-n", args.n)
    config = _tasks_config(args)
    task = load_task(args.task, config.tasks)
    data = task.split(args.split)
    rows = [data[i] for i in range(min(args.n, len(data)))]
    shown = [{"prompt": render_prompt(task.spec, r), "answer": task.spec.label_words[r["label"]],
              "label": task.spec.class_names[r["label"]]} for r in rows]
    if args.json:
        print(json.dumps({**task.summary(), "examples": shown}))
        return 0
    s = task.summary()
    print(f"{task.name}: {s['kind']}, {task.num_classes} classes "
          f"({', '.join(f'{c}={w!r}' for c, w in zip(s['classes'], s['label_words']))}); "
          f"{s['train']}/{s['validation']}/{s['test']} examples; {s['source']}; license {s['license']}")
    for i, ex in enumerate(shown):
        print(f"--- {args.split} example {i} (label {ex['label']})")
        print(f"{ex['prompt']}{ex['answer']}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from jax_ensemble.data import load_suite
    from jax_ensemble.models.loading import load_pretrained
    from jax_ensemble.stages.zero_shot import evaluate_zero_shot
    from jax_ensemble.training.mesh import initialize_distributed, leaf_sharding, make_mesh

    if not args.zero_shot:
        raise ConfigError("evaluate needs a mode: --zero-shot (the base model on each task's label words)")
    config = _tasks_config(args)
    initialize_distributed(config.mesh)
    tasks = load_suite(config.tasks)
    mesh = make_mesh(config.mesh)  # more than one device: the model loads into its shardings and runs there
    model, tokenizer = load_pretrained(
        config.model.source, base_dtype=config.model.base_dtype, compute_dtype=config.model.compute_dtype,
        kernels=config.model.kernels, sharding=leaf_sharding(mesh) if mesh.size > 1 else None,
    )
    results = evaluate_zero_shot(model, tokenizer, tasks, split=args.split, batch_size=config.tasks.batch_size,
                                 max_length=config.tasks.max_length, mesh=mesh if mesh.size > 1 else None)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"zero-shot {args.split} accuracy of {config.model.source} ({config.model.base_dtype} base)")
    for r in results:
        print(f"  {r['task']:<24} {r['accuracy']:.3f}  (majority class {r['majority_baseline']:.3f}, "
              f"{r['examples']} examples, {r['num_classes']} classes)")
    print(f"  {'mean':<24} {sum(r['accuracy'] for r in results) / len(results):.3f}")
    return 0


def _cmd_gradients(args: argparse.Namespace) -> int:
    from jax_ensemble.stages.gradients import gradient_stage
    from jax_ensemble.storage.atomic import read_verified_json

    directory = gradient_stage(_job_config(args))
    manifest = read_verified_json(directory / "manifest.json")
    if args.json:
        print(json.dumps({"directory": str(directory), **manifest}))
        return 0
    rows = sum(s["examples"] for t in manifest["tasks"] for shards in t["splits"].values() for s in shards)
    print(f"gradients: {rows} examples of {len(manifest['tasks'])} tasks, d = {manifest['projector']['dim']} "
          f"({manifest['projector']['kind']}, seed {manifest['projector']['seed']}), "
          f"{manifest['num_features']:,} features ({manifest['feature_space']}), "
          f"strategy {', '.join(sorted(set(manifest['strategies_by_length'].values()))) or 'none (all cached)'}")
    print(f"directory: {directory}")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from jax_ensemble.stages.grouping import affinity_stage, load_affinity

    directory = affinity_stage(_job_config(args))
    stage = load_affinity(directory)
    if args.json:
        print(json.dumps({"directory": str(directory), **stage}))
        return 0
    print(f"affinity: {len(stage['subsets'])} subsets of {len(stage['subsets'][0])} / {len(stage['tasks'])} tasks "
          f"(pair coverage {stage['pair_coverage']:.0%}), {stage['rows']} rows, d = {stage['dim']}, "
          f"{stage['solver']}: {stage['converged']}/{len(stage['subsets'])} converged in <= {stage['max_iterations']} "
          f"iterations, {stage['estimate_seconds']:.2f} s")
    print(f"directory: {directory}")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from jax_ensemble.stages.grouping import grouping_stage

    summary = grouping_stage(_job_config(args))
    if args.json:
        print(json.dumps(summary))
        return 0
    info = summary["info"]
    print(f"{summary['method']}: {summary['num_groups']} groups"
          + (f" (m from {info['num_groups_from']})" if "num_groups_from" in info else "")
          + (f", SDP {info['status']} in {info['solve_seconds']:.2f} s ({info['solver']})" if "status" in info else ""))
    for k, group in enumerate(summary["groups"]):
        print(f"  group {k}: {', '.join(group)}")
    print(f"heatmap: {summary['heatmap']}")
    return 0


def _cmd_add_tasks(args: argparse.Namespace) -> int:
    from jax_ensemble.stages.add_tasks import add_tasks

    result = add_tasks(args.run, args.tasks)
    if args.json:
        print(json.dumps(result))
        return 0
    for name in result["added"]:
        where, gain = result["placement"][name]["group"], result["placement"][name]["estimated_gain"]
        print(f"{name}: {'a group of its own' if where is None else f'group {where}'} (estimated gain per group "
              + ", ".join(f"{g:+.3f}" for g in gain["groups"]) + f"; alone {gain['alone']:+.3f})")
    print("groups: " + " | ".join(", ".join(g) for g in result["groups"]))
    print(f"retrained: {', '.join(result['retrained'])}; ensemble weights refit for {', '.join(result['affected_tasks'])}")
    acc = result["per_task_accuracy"]
    print("test accuracy: " + ", ".join(f"{n} {acc['ensemble'][n]:.3f} (zero-shot {acc['zero_shot'][n]:.3f})"
                                        for n in result["added"])
          + f"; average over all tasks {result['average_accuracy']:.3f} (run: {result['run_average_accuracy']:.3f})")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
    print(f"directory: {result['directory']}")
    return 0


def _cmd_validate_estimates(args: argparse.Namespace) -> int:
    from jax_ensemble.stages.estimate_validation import LOSS_RANK_CORRELATIONS, PREDICTORS, validate_estimates

    summary = validate_estimates(_job_config(args), args.subsets)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{len(summary['subsets'])} subsets fine-tuned, {len(summary['pairs'])} (subset, task) pairs; "
          "validation loss and accuracy, estimated vs actual")
    print(f"  {'subset':>6} {'task':<24} {'loss':>7} {'linear':>7} {'weights':>7} {'acc':>6} {'linear':>7} {'weights':>7}")
    for p in summary["pairs"]:
        print(f"  {p['subset']:>6} {p['task']:<24} {p['actual']['loss']:>7.3f} {p['linear']['loss']:>7.3f} "
              f"{p['weight_space']['loss']:>7.3f} {p['actual']['accuracy']:>6.3f} {p['linear']['accuracy']:>7.3f} "
              f"{p['weight_space']['accuracy']:>7.3f}")
    for name in PREDICTORS:
        e = summary["errors"][name]
        ranks = [f"{e[k]:.2f}" if k in e else "-" for k in LOSS_RANK_CORRELATIONS]  # older results lack some
        print(f"  {name + ' estimate:':<24} mean relative loss error {e['mean_relative_error_loss']:.3f}, "
              f"mean abs accuracy error {e['mean_abs_error_accuracy']:.3f}, loss Spearman over pairs / of the "
              f"change from the base / within tasks {' / '.join(ranks)}")
    if "per_task" in summary:  # results written before the per-task summary existed lack it
        print("  linear estimate by task (worst accuracy error first): " + ", ".join(
            f"{task} {t['accuracy']['linear']:.2f} vs {t['accuracy']['actual']:.2f}"
            for task, t in summary["per_task"].items()))
    print("  linear estimate by affinity.l2 (in-sample for these subsets; loss error / accuracy error"
          " / loss Spearman): " + ", ".join(
              f"{r['l2']:g}: {r['mean_relative_error_loss']:.3f} / {r['mean_abs_error_accuracy']:.3f}"
              + (f" / {r['loss_spearman']:.2f}" if "loss_spearman" in r else "") for r in summary["l2_sweep"]))
    t = summary["timing"]
    if t["speedup"] is not None:
        print(f"wall time: estimating all {t['subsets_in_stage']} subsets {t['estimate_seconds_all_subsets']:.0f} s "
              f"(gradients {t['gradient_seconds']:.0f} s + solve {t['solve_seconds_all_subsets']:.1f} s) vs fine-tuning "
              f"{t['finetune_seconds_per_subset']:.0f} s per subset: speedup {t['speedup']:.1f}x "
              f"(marginal, without the one-off gradients: {t['marginal_speedup']:.0f}x)")
    else:
        print("speedup unknown: the gradient stage or an adapter was computed by a version without timing")
    print(f"scatter: {summary['scatter_png']}")
    return 0


def _cmd_uq(args: argparse.Namespace) -> int:
    from jax_ensemble.stages.preflight import check_run_dir
    from jax_ensemble.stages.uq import run_uq

    seeds = None
    if args.seeds is not None:  # `--seeds 0 1 2 key=value`: the key=value words are overrides, not seeds
        args.overrides = [*args.overrides, *(w for w in args.seeds if "=" in w)]
        words = [w for w in args.seeds if "=" not in w]
        if not words or not all(w.lstrip("-").isdigit() for w in words):
            raise ConfigError(f"uq --seeds takes integers, got {' '.join(args.seeds)}")
        seeds = [int(w) for w in words]
    config = _tasks_config(args)
    check_run_dir(config)
    summary = run_uq(config, seeds)
    if args.json:
        print(json.dumps(summary))
        return 0
    seeds = summary["seeds"]
    print(f"uq: {summary['members']} members, trained on {', '.join(summary['in_distribution'])}; "
          f"OOD: {', '.join(summary['out_of_distribution'])}; ECE with {summary['num_bins']} bins; "
          f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" + (" (mean ± std)" if len(seeds) > 1 else ""))
    keys = ("accuracy", "ece", "nll", "brier", "ood_auroc")
    width = 15 if len(seeds) > 1 else 9
    print(f"  {'method':<12} " + " ".join(f"{k:>{width}}" for k in keys))
    for name, r in summary["results"].items():
        cells = [f"{r[k]:.3f}" + (f" ± {summary['std'][name][k]:.3f}" if len(seeds) > 1 else "") for k in keys]
        print(f"  {name:<12} " + " ".join(f"{c:>{width}}" for c in cells))
    if len(seeds) > 1:
        print("  method − single, mean [95% interval]:")
        for name, row in summary["minus_single"].items():
            print(f"  {name:<12} " + "  ".join(
                f"{k} {row[k]['mean']:+.3f} [{row[k]['ci95'][0]:+.3f}, {row[k]['ci95'][1]:+.3f}]" for k in keys))
    print(f"tables: {summary['table_md']}; reliability diagrams: uq/seed-<s>/reliability.png in the run directory")
    return 0


def _cmd_linearization_error(args: argparse.Namespace) -> int:
    from jax_ensemble.stages.linearization_study import format_table, run_study, study_outputs

    config = _job_config(args)
    result = run_study(config)
    json_path, png_path = study_outputs(config, result)
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_table(result))
    print(f"written: {json_path}, {png_path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from jax_ensemble.stages.train_tasks import adapter_on_tasks

    config = _job_config(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    out = args.out or config.resolved_run_dir() / "train"
    summary = adapter_on_tasks(config, tasks, out)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
        return 0
    print(f"trained one adapter on {', '.join(summary['tasks'])}: {summary['steps']} steps "
          f"({summary['train_examples']} train examples, {summary['train_seconds']:.0f} s"
          f"{', stopped early' if summary['stopped_early'] else ''})")
    for name, accuracy in summary["per_task_accuracy"].items():
        print(f"  {name:<24} validation accuracy {accuracy:.3f}  (zero-shot {summary['zero_shot_accuracy'][name]:.3f})")
    print(f"checkpoint: {summary['checkpoint']}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses

    from jax_ensemble.config import load_config
    from jax_ensemble.stages.plan import DEFAULT_DEVICE, DEVICES, format_plan, plan_run

    config = load_config(args.config, args.overrides)
    if args.device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}; got {args.device!r}")
    device = DEVICES[args.device or DEFAULT_DEVICE]
    if args.device_memory is not None:
        if args.device_memory <= 0:
            raise ConfigError(f"--device-memory must be > 0 GiB, got {args.device_memory}")
        device = dataclasses.replace(device, memory_bytes=int(args.device_memory * 2**30), usable_fraction=1.0)
    if args.peak_tflops is not None:
        if args.peak_tflops <= 0:
            raise ConfigError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
        device = dataclasses.replace(device, peak_flops={k: args.peak_tflops * 1e12 for k in device.peak_flops})
    devices = args.devices
    if devices is None:
        sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        devices = 1 if -1 in sizes else sizes[0] * sizes[1] * sizes[2]
    _check_count("--subsets", args.subsets)
    plan = plan_run(config, devices=devices, device=device, efficiency=args.efficiency, validate_subsets=args.subsets)
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0


def version_line() -> str:
    """``jax-ensemble X (jax …, jaxlib …, flax …, Python …)``: what ``--version`` prints."""
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"
    stack = ", ".join(f"{name} {version(name)}" for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"))
    return f"jax-ensemble {version('jax-ensemble')} ({stack}, Python {sys.version.split()[0]})"


class _ProcessZero(logging.Filter):
    """Keeps records of process 0 only once ``jax.distributed`` has joined a multi-process run."""

    def filter(self, record: logging.LogRecord) -> bool:
        import jax

        return not jax.distributed.is_initialized() or jax.process_index() == 0


def configure_logging(level: str) -> None:
    """Log records of ``jax_ensemble.*`` at ``level`` and above to stderr (process 0 only)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_ProcessZero())
    logger = logging.getLogger("jax_ensemble")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


SUITE_HELP = "offline10 | superglue10 | planted_conflict | suite .yaml (default: config)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-ensemble",
        description="Fine-tune one language model on many datasets at once (JAX/Flax NNX).",
    )
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="stderr logging threshold (default info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="greedy completion of a prompt (check a model by hand)")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--model", default="smollm2-135m", help="registry name, local path or hub id")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--base-dtype", default="float32", help="int8 | bfloat16 | float32 (default float32)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(handler=_cmd_generate)

    def config_args(p: argparse.ArgumentParser, example: str = "tasks.train_size=100") -> None:
        shipped = ", ".join(sorted(path.stem for path in (Path(__file__).parent / "configs").glob("*.yaml")))
        p.add_argument("--config", default=None,
                       help=f"a shipped config's name ({shipped}) or a YAML path (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")

    run = sub.add_parser("run", help="the main job: estimate, cluster, train groups and baselines, "
                                     "ensemble + boosting, evaluate, report")
    config_args(run, "lora.rank=8")
    run.set_defaults(handler=_cmd_run)

    data = sub.add_parser("data", help="list tasks and show rendered examples")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    data_list = data_sub.add_parser("list", help="each task of a suite with its classes and split sizes")
    data_list.add_argument("--suite", default=None, help=SUITE_HELP)
    data_list.add_argument("--json", action="store_true", help="print one JSON list")
    config_args(data_list)
    data_list.set_defaults(handler=_cmd_data_list)
    data_show = data_sub.add_parser("show", help="rendered prompts of a task with their answers")
    data_show.add_argument("task", metavar="TASK", help="built-in task name or task spec file")
    data_show.add_argument("-n", type=int, default=3, help="how many examples (default 3)")
    data_show.add_argument("--split", default="train", choices=("train", "validation", "test"))
    data_show.add_argument("--json", action="store_true", help="print one JSON object")
    config_args(data_show)
    data_show.set_defaults(handler=_cmd_data_show)

    evaluate = sub.add_parser("evaluate", help="evaluate the model on a suite's tasks")
    evaluate.add_argument("--zero-shot", action="store_true", help="the base model, no fine-tuning")
    evaluate.add_argument("--suite", default=None, help=SUITE_HELP)
    evaluate.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    evaluate.add_argument("--json", action="store_true", help="print one JSON list")
    config_args(evaluate)
    evaluate.set_defaults(handler=_cmd_evaluate)

    grads = sub.add_parser("gradients", help="per-example projected gradients at the base model (shards + manifest)")
    grads.add_argument("--json", action="store_true", help="print the manifest as one JSON object")
    config_args(grads, "gradients.dim=200")
    grads.set_defaults(handler=_cmd_gradients)

    estimate = sub.add_parser("estimate", help="task subsets, their linearized fine-tuning estimates, task affinity")
    estimate.add_argument("--json", action="store_true", help="print the stage's affinity.json as one JSON object")
    config_args(estimate)
    estimate.set_defaults(handler=_cmd_estimate)

    cluster = sub.add_parser("cluster", help="group the tasks by their affinity (SDP or a baseline); heatmap PNG")
    cluster.add_argument("--json", action="store_true", help="print one JSON object (groups, method, info)")
    config_args(cluster)
    cluster.set_defaults(handler=_cmd_cluster)

    add = sub.add_parser("add-tasks", help="add tasks to a finished run: their gradients and subsets only, the group "
                                           "each fits best (or a new one), that group retrained, weights refit")
    add.add_argument("tasks", nargs="+", metavar="TASK", help="built-in task names or task spec files")
    add.add_argument("--run", required=True, help="the finished run's directory (its config.json and metrics.json)")
    add.add_argument("--json", action="store_true", help="print one JSON object")
    add.set_defaults(handler=_cmd_add_tasks)

    validate = sub.add_parser("validate-estimates",
                              help="fine-tune K sampled subsets for real and compare with their estimates")
    validate.add_argument("--subsets", type=int, default=5, help="how many of the affinity stage's subsets (default 5)")
    validate.add_argument("--json", action="store_true",
                          help="print one JSON object (mean_relative_error_loss, mean_abs_error_accuracy, speedup, ...)")
    config_args(validate)
    validate.set_defaults(handler=_cmd_validate_estimates)

    lin = sub.add_parser("linearization-error",
                         help="fine-tune LoRA for several step counts and compare f with its linearization f_lin")
    lin.add_argument("--json", action="store_true", help="print one JSON object with a list 'settings'")
    config_args(lin, "linearization.steps=[5,0]")
    lin.set_defaults(handler=_cmd_linearization_error)

    uq = sub.add_parser("uq", help="single adapter vs LoRA ensemble vs MC dropout: calibration and OOD detection")
    uq.add_argument("--json", action="store_true",
                    help="print one JSON object (results: method -> metric -> mean over the seeds; std; minus_single)")
    uq.add_argument("--seeds", nargs="+", default=None, metavar="SEED",
                    help="repeat the experiment for each seed (default: the config's seed); each seed resumes from "
                         "its uq/seed-<s>/results.json")
    config_args(uq)
    uq.set_defaults(handler=_cmd_uq)
    plan = sub.add_parser("plan", help="per-stage memory per device, FLOPs and time on a mesh, from the "
                                       "architecture alone (no weights)")
    plan.add_argument("--devices", type=int, default=None,
                      help="device count (default: the config's mesh sizes multiplied; 1 with a -1 size)")
    plan.add_argument("--device", default="h100", help="h100 | h200 | a100 | v5e | v5p | v4 (default h100)")
    plan.add_argument("--device-memory", type=float, default=None, help="GiB per device (all of it usable)")
    plan.add_argument("--peak-tflops", type=float, default=None, help="dense peak TFLOP/s per device")
    plan.add_argument("--efficiency", type=float, default=0.35,
                      help="fraction of peak the time assumes (default 0.35, an assumption)")
    plan.add_argument("--subsets", type=int, default=5, help="validate-estimates subsets to price (default 5)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    config_args(plan, "mesh.fsdp=8")
    plan.set_defaults(handler=_cmd_plan)
    train = sub.add_parser("train", help="train one LoRA adapter on some tasks and evaluate it per task")
    train.add_argument("--tasks", default=None, help="comma-separated task names or spec files (default: the suite)")
    train.add_argument("--out", default=None, help="run directory (default: <run_dir>/train); a killed run resumes")
    train.add_argument("--json", action="store_true",
                       help="print one JSON object (per_task_accuracy, zero_shot_accuracy, checkpoint, ...)")
    config_args(train)
    train.set_defaults(handler=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides given after options (e.g. ``data show TASK -n 2 k=v``)
        if not (hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    configure_logging(args.log_level)
    from jax_ensemble.storage.compilation_cache import enable_compilation_cache

    enable_compilation_cache()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except JaxEnsembleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
