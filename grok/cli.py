"""Command line: `python run.py [generate] [flags]` (also installed as the `grok` command)."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from grok.api import Grok, SamplingParams
from grok.checkpoint import CheckpointError
from grok.demo import DEMO_CONFIG, write_demo_checkpoint
from grok.tokenizer import ByteTokenizer

log = logging.getLogger("grok")

DEFAULT_CHECKPOINT = Path("checkpoints/ckpt-0")
DEFAULT_TOKENIZER = Path("checkpoints/tokenizer.model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Grok-1 inference. With no checkpoint present, runs a small random-weight demo.",
    )
    commands = parser.add_subparsers(dest="command")
    gen = commands.add_parser("generate", help="sample a continuation of a prompt (the default command)")
    gen.add_argument(
        "--checkpoint",
        type=Path,
        help=f"release checkpoint directory (default: {DEFAULT_CHECKPOINT} if present, else the demo)",
    )
    gen.add_argument("--tokenizer", type=Path, help=f"SentencePiece model (default: {DEFAULT_TOKENIZER})")
    gen.add_argument("--config", default="grok-1", help="preset name or JSON config file (default: grok-1)")
    gen.add_argument("--prompt", default="The answer to life the universe and everything is of course")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    gen.add_argument("--temperature", type=float, default=0.7, help="0 means greedy (default: 0.7)")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)")
    gen.add_argument("--top-k", type=int, default=0, help="keep only the k likeliest tokens; 0 = off")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "generate")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return generate(args)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def generate(args: argparse.Namespace) -> int:
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    checkpoint = args.checkpoint
    if checkpoint is None and DEFAULT_CHECKPOINT.is_dir():
        checkpoint = DEFAULT_CHECKPOINT
    if checkpoint is None:
        with tempfile.TemporaryDirectory() as tmp:
            print(
                f"No checkpoint given and none at {DEFAULT_CHECKPOINT}: running the built-in demo, a small "
                "Grok-shaped model with RANDOM weights (its output is meaningless) and a byte-level tokenizer."
            )
            directory = write_demo_checkpoint(Path(tmp) / "ckpt-0")
            model = Grok.from_checkpoint(directory, DEMO_CONFIG, ByteTokenizer())
        return _print_generation(model, args, sampling)
    tokenizer = args.tokenizer or DEFAULT_TOKENIZER
    log.info("loading %s with config %s", checkpoint, args.config)
    model = Grok.from_checkpoint(checkpoint, args.config, tokenizer)
    return _print_generation(model, args, sampling)


def _print_generation(model: Grok, args: argparse.Namespace, sampling: SamplingParams) -> int:
    result = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling)
    print(f"Prompt: {args.prompt}")
    print(f"Output: {result.text}")
    print(f"({len(result.token_ids)} tokens, finished by {result.finish_reason})")
    return 0
