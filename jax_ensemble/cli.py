"""Command line: ``jax-ensemble <command> ...``.

User errors (:class:`~jax_ensemble.errors.JaxEnsembleError`) print one line
``error: ...`` on stderr and exit with status 2; argparse usage errors also exit 2.
Machine-readable results go to stdout with ``--json``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from jax_ensemble.errors import JaxEnsembleError


def _cmd_generate(args: argparse.Namespace) -> int:
    from jax_ensemble.config import ModelConfig
    from jax_ensemble.generate import greedy_generate
    from jax_ensemble.models.loading import load_pretrained

    ModelConfig(source=args.model, base_dtype=args.base_dtype)
    model, tokenizer = load_pretrained(args.model, base_dtype=args.base_dtype)
    out = greedy_generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"model": args.model, "base_dtype": args.base_dtype, "prompt": out.prompt,
                          "completion": out.completion, "new_token_ids": out.new_ids}))
    else:
        print(out.prompt + out.completion)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from jax_ensemble.config import load_config
    from jax_ensemble.pipeline import run

    run(load_config(args.config, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-ensemble",
        description="Fine-tune one language model on many datasets at once (JAX/Flax NNX).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="greedy completion of a prompt (check a model by hand)")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--model", default="smollm2-135m", help="registry name, local path or hub id")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--base-dtype", default="float32", help="int8 | bfloat16 | float32 (default float32)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(handler=_cmd_generate)

    run = sub.add_parser("run", help="the main job: every stage that exists, on a config")
    run.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lora.rank=8")
    run.set_defaults(handler=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
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
