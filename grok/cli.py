"""Command line: `python run.py [generate] [flags]` (also installed as the `grok` command)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import runpy
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn

import jax

from grok.checkpoint.demo import DEMO_CONFIG, write_demo_checkpoint
from grok.checkpoint.files import CheckpointError, find_checkpoint_dir
from grok.model.config import GrokConfig, load_config
from grok.model.transformer import cache_dtype
from grok.parallel import distributed, threads
from grok.parallel.channel import ChannelError
from grok.parallel.sharding import Sharder, load_rules, make_mesh, mesh_of, mesh_text, parse_mesh
from grok.planning.aot import WEIGHT_FORMS
from grok.planning.plan import choose_layout, make_plan
from grok.planning.targets import TARGETS, use_cpu_backend
from grok.serving.api import Grok, SamplingParams
from grok.serving.chat import PRESET_TEMPLATES, ChatTemplate
from grok.serving.engine import Engine, Scheduling
from grok.serving.pod import HEARTBEAT_TIMEOUT_S
from grok.serving.prefix_cache import DEFAULT_SHARE, default_bytes
from grok.serving.tokenizer import BYTE_TOKENIZER, ByteTokenizer

log = logging.getLogger("grok")

# serve's scheduling defaults (measured: see the README's "Serving")
DEFAULT_SPECULATE = 4
DEFAULT_SPECULATE_MAX_BATCH = 1

DEFAULT_CHECKPOINT = Path("checkpoints/ckpt-0")
DEFAULT_TOKENIZER = Path("checkpoints/tokenizer.model")


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line (unknown flag, missing or out-of-range value) as the one-line
    `error: ...` with exit status 2 of every other problem, not usage and a second line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _ranged(
    kind: type[int] | type[float], low: float, high: float | None = None, *, low_open: bool = False
) -> Callable[[str], int | float]:
    """An argparse `type`: the flag's text as a (finite) `kind` in low..high, `low` itself excluded if
    `low_open`; anything else is the flag's error, which says what it must be."""
    noun = "an integer" if kind is int else "a number"
    if high is None:
        want = f"{noun} {'>' if low_open else '>='} {low}"
    elif kind is int:
        want = f"{noun} in {low}..{high}"
    else:
        want = f"{noun} in {'(' if low_open else '['}{low}, {high}]"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (
            value is None
            or (kind is float and not math.isfinite(value))
            or not (value > low if low_open else value >= low)
            or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    return parse


POSITIVE = _ranged(int, 1)  # counts and sizes


def _budget(text: str) -> int | None:
    """--prefill-budget: `auto` (None) or a token count."""
    return None if text == "auto" else _ranged(int, 1)(text)
SEED = _ranged(int, 0, 2**32 - 1)  # the engine holds seeds as uint32


def _prefix_cache_flag(parser) -> None:
    parser.add_argument(
        "--prefix-cache-mb", type=_ranged(float, 0), metavar="MB",
        help="device memory (all devices together) for cached prompt blocks, reused by prompts that start the "
        f"same way; 0 turns the prefix cache off (default: {DEFAULT_SHARE * 100:.0f}%% of the KV cache's memory)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="run.py",
        description="Grok-1 inference. With no command, `generate`; with no checkpoint present, a random-weight demo.",
    )
    commands = parser.add_subparsers(dest="command")
    model_flags = _model_flags()

    gen = commands.add_parser(
        "generate",
        parents=[model_flags],
        help="sample a continuation of a prompt (the default command)",
        description="Sample a continuation of a prompt. On many hosts, run the same command on each "
        "with --coordinator, --num-processes and its own --process-id; only process 0 prints.",
    )
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt",
        default="The answer to life the universe and everything is of course",
        help="the prompt text (default: a line from the reference runner)",
    )
    prompt.add_argument(
        "--prompt-ids",
        metavar="IDS",
        help="the prompt as comma-separated token ids, e.g. 5,6,7 (instead of --prompt; needs no tokenizer)",
    )
    gen.add_argument("--max-new-tokens", type=POSITIVE, default=32, help="tokens to generate (default: 32)")
    gen.add_argument("--temperature", type=_ranged(float, 0), default=0.7, help="0 means greedy (default: 0.7)")
    gen.add_argument(
        "--top-p", type=_ranged(float, 0, 1, low_open=True), default=0.95, help="nucleus sampling mass (default: 0.95)"
    )
    gen.add_argument(
        "--top-k", type=_ranged(int, 0, 2**31 - 1), default=0, help="keep only the k likeliest tokens; 0 = off"
    )
    gen.add_argument("--seed", type=SEED, default=0, help="sampling seed, 0..2**32-1 (default: 0)")

    srv = commands.add_parser(
        "serve",
        parents=[model_flags],
        help="serve the OpenAI-compatible completions API over HTTP",
        description="Serve /v1/completions, /v1/models, /health and /metrics; all requests share one "
        "continuously batched engine.",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=_ranged(int, 1, 65535), default=8000, help="port (default: 8000)")
    srv.add_argument("--model-name", default="grok-1", help="the model id clients ask for (default: grok-1)")
    srv.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` on /v1 (default: $GROK_API_KEY if set, else none; "
        "an empty key is an error)",
    )
    srv.add_argument("--max-batch", type=POSITIVE, default=8, help="concurrent sequences (KV-cache slots; default: 8)")
    srv.add_argument(
        "--cache-len", type=POSITIVE,
        help=f"KV-cache positions per slot (default: the config's sequence_len, at most {DEFAULT_CACHE_LEN})",
    )
    srv.add_argument(
        "--max-queue", type=POSITIVE, default=64, help="waiting requests before answering 429 (default: 64)"
    )
    sched = srv.add_argument_group("scheduling (see the README's \"Serving\")")
    sched.add_argument(
        "--prefill-budget", type=_budget, default=None, metavar="TOKENS|auto",
        help="prompt tokens prefilled per engine step while other streams decode, so a long prompt delays "
        "their tokens by one bounded chunk at a time; auto (the default) takes the largest chunk that "
        "runs no longer than a decode step, as measured while serving",
    )
    _prefix_cache_flag(sched)
    sched.add_argument(
        "--speculate", type=_ranged(int, 0), default=DEFAULT_SPECULATE, metavar="N",
        help="tokens proposed per greedy stream and step by prompt lookup and verified in one step; 0 is off "
        f"(default: {DEFAULT_SPECULATE})",
    )
    sched.add_argument(
        "--speculate-max-batch", type=POSITIVE, default=DEFAULT_SPECULATE_MAX_BATCH, metavar="N",
        help=f"speculate only while at most N streams decode (default: {DEFAULT_SPECULATE_MAX_BATCH})",
    )
    srv.add_argument(
        "--chat-template", metavar="FILE", help="JSON file that turns /v1/chat/completions messages into a prompt "
        "(format: grok/serving/chat.py; default: with --config grok-2 its own, grok/serving/chat_templates/grok2.json; "
        "else grok/serving/chat_templates/plain.json, 'User: ...' lines, stop at '\\nUser:')",
    )

    dl = commands.add_parser(
        "download",
        help="fetch ckpt-0/ and tokenizer.model from the Hugging Face Hub, then verify them",
        description="Download (resumably) the release checkpoint and tokenizer, then check every tensor file.",
    )
    dl.add_argument("--repo", default="xai-org/grok-1", help="Hub repository (default: xai-org/grok-1; Grok-2's: "
                    "xai-org/grok-2)")
    dl.add_argument("--local-dir", type=Path, default=Path("checkpoints"), help="destination (default: checkpoints)")
    dl.add_argument("--revision", help="branch, tag or commit (default: main)")
    dl.add_argument("--endpoint", help="Hub URL (default: $HF_ENDPOINT, else huggingface.co)")
    dl.add_argument("--config", help="config to verify the files against (default: grok-2 for a grok-2 repository, "
                    "else grok-1)")
    dl.add_argument("-v", "--verbose", action="store_true", help="log debug messages")

    conv = commands.add_parser(
        "convert",
        help="convert a pickle checkpoint to safetensors (loads faster, no unpickling, per-shard reads)",
        description="Stream a release checkpoint tensor by tensor into safetensors files; rerun to resume.",
    )
    conv.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help=f"source (default: {DEFAULT_CHECKPOINT})")
    conv.add_argument(
        "--output",
        type=Path,
        default=Path("checkpoints/safetensors"),
        help="destination directory (default: checkpoints/safetensors, which generate/serve then prefer)",
    )
    conv.add_argument("--config", default="grok-1", help="preset name or JSON config file (default: grok-1)")
    conv.add_argument(
        "--quantize", choices=("int8",),
        help="int8: write Grok-2's bf16 release as int8 with per-column bf16 scales (needed for Grok-2; "
        "Grok-1's checkpoint is 8-bit already)",
    )
    conv.add_argument("-v", "--verbose", action="store_true", help="log debug messages")

    pl = commands.add_parser(
        "plan",
        help="will the model fit a pod? per-device memory of a layout, compiled ahead of time (no weights)",
        description="Count each device's parameter and KV-cache bytes and compile the engine's decode step "
        "and largest prefill chunk abstractly, for the real shapes on N virtual CPU devices; no weight is "
        "allocated or downloaded. Then say which common device sizes the total fits.",
    )
    pl.add_argument("--config", default="grok-1", help="preset name or JSON config file (default: grok-1)")
    pl.add_argument("--mesh", metavar="AXIS=N,...", help="mesh shape (default: the recommendation for the devices)")
    pl.add_argument("--rules", metavar="NAME_OR_PATH", help="partition rules (default: the recommendation)")
    pl.add_argument(
        "--batch", type=POSITIVE, default=8, help="concurrent sequences, as serve's --max-batch (default: 8)"
    )
    pl.add_argument(
        "--cache-len", type=POSITIVE,
        help=f"KV-cache positions per sequence (default: the config's sequence_len, at most {DEFAULT_CACHE_LEN})",
    )
    pl.add_argument(
        "--weights", choices=WEIGHT_FORMS, default="int8",
        help="int8 (default): 8-bit matrices, as Grok-1 is released and Grok-2 is held with --quantize int8; "
        "bf16: every weight bf16, as Grok-2 is released",
    )
    pl.add_argument(
        "--cpu-devices", "--devices", type=POSITIVE, metavar="N",
        help="devices of the pod (default: the --mesh's size, else 8)",
    )
    pl.add_argument(
        "--target", choices=tuple(TARGETS), default="cpu",
        help="whose compiler compiles the programs, with no device present: an accelerator's own (needs "
        "`pip install -e '.[targets]'`; adds the decode step's memory traffic against its ideal and a "
        "projected speed), or cpu, virtual CPU devices (default)",
    )
    _prefix_cache_flag(pl)
    pl.add_argument("--json", action="store_true", help="also print the plan as one JSON object, on the last line")
    pl.add_argument("-v", "--verbose", action="store_true", help="log debug messages")

    bench = commands.add_parser(
        "bench",
        help="run the engine benchmark (bench/bench_engine.py; pass its flags after `bench`; --threads N "
        "is taken here, as for generate)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="flags for bench/bench_engine.py (try --help)")
    bench.set_defaults(verbose=False)
    return parser


# --weight-format -> `Grok(cpu_format=...)`
WEIGHT_FORMATS = {"auto": None, "int8": False, "cpu": True}


def _model_flags() -> argparse.ArgumentParser:
    """Flags shared by the commands that load a model: checkpoint, config, sharding, processes."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--checkpoint",
        type=Path,
        help=f"release checkpoint directory (default: {DEFAULT_CHECKPOINT} if present, else the demo)",
    )
    flags.add_argument(
        "--tokenizer",
        metavar=f"FILE|{BYTE_TOKENIZER}",
        help=f"SentencePiece model file, or `{BYTE_TOKENIZER}`: the demo's byte-level tokenizer, one token per "
        f"UTF-8 byte at the release's byte-piece ids (default: {DEFAULT_TOKENIZER}; with --prompt-ids, none "
        "unless given)",
    )
    flags.add_argument("--config", default="grok-1", help="preset name or JSON config file (default: grok-1)")
    flags.add_argument(
        "--weight-format",
        choices=sorted(WEIGHT_FORMATS),
        default="auto",
        help="int8: the released 8-bit weights as loaded (on one CPU device read by native int8 kernels, the "
        "embedding table in bf16); cpu: dequantized once to float32 (4x the memory, slower; one device only; "
        "kept for comparison); auto (default): int8. Same numbers either way",
    )
    flags.add_argument(
        "--quantize", choices=("int8",),
        help="int8: hold a float checkpoint's matrices (Grok-2's bf16 release) as int8 with a bf16 scale per "
        "output column, about half the memory (default: as stored; Grok-1's checkpoints are 8-bit already)",
    )
    shard = flags.add_argument_group(
        "sharding",
        "A checkpoint is sharded over a mesh of every device of every process, by default the layout "
        "partition_rules/README.md recommends for the device count (`run.py plan` shows it). The demo "
        "runs on one device unless --mesh or --rules is given (or, with many processes, is replicated).",
    )
    shard.add_argument(
        "--mesh",
        metavar="AXIS=N,...",
        help="mesh shape over the rules' axes, e.g. data=1,model=8 or data=1,expert=4,model=8; the sizes "
        "multiply to the total device count (default: the recommendation for the device count)",
    )
    shard.add_argument(
        "--rules",
        metavar="NAME_OR_PATH",
        help="partition rules: a shipped name (tensor_parallel, expert_tensor_parallel, expert_parallel, "
        "replicated) or a .toml file (default: the recommendation for the device count, or the one "
        "whose axes --mesh names)",
    )
    multi = flags.add_argument_group(
        "many processes",
        f"Each flag falls back to an environment variable ({distributed.ENV_COORDINATOR}, "
        f"{distributed.ENV_NUM_PROCESSES}, {distributed.ENV_PROCESS_ID}, {distributed.ENV_DISTRIBUTED}). "
        "Without a coordinator, a cluster that JAX recognizes (SLURM srun, Open MPI mpirun, a Cloud TPU pod "
        "slice, a Kubernetes indexed Job) is joined automatically; else this is a single process.",
    )
    multi.add_argument(
        "--distributed",
        choices=distributed.MODES,
        help="auto (default): with no --coordinator, detect a cluster of several processes and call "
        "jax.distributed.initialize() with no arguments; off: never detect (a single process unless "
        "--coordinator is given)",
    )
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    # Checked, with their environment variables, by `distributed.initialize`.
    multi.add_argument("--num-processes", type=int, metavar="N", help="number of processes taking part")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1")
    multi.add_argument(
        "--heartbeat-timeout", type=_ranged(float, 0.5), metavar="SECONDS", default=HEARTBEAT_TIMEOUT_S,
        help="on several processes, the leader's: a follower silent for this long is lost (the run ends "
        f"with an error), and so is the leader to its followers (default {HEARTBEAT_TIMEOUT_S:g})",
    )
    multi.add_argument(
        "--cpu-devices",
        type=int,
        metavar="N",
        help="development: run on N virtual CPU devices per process (selects the CPU platform)",
    )
    flags.add_argument(
        "--threads", type=POSITIVE, metavar="N",
        help="threads for the work on CPUs: XLA:CPU's thread pool and the native kernels (default: the CPUs "
        f"this process may use, {threads.available_cpus()} here)",
    )
    flags.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return flags


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "generate")
    if argv[0] == "bench":  # everything after `bench` is the benchmark's (argparse's REMAINDER drops leading flags)
        args = build_parser().parse_args(argv[:1])
        args.bench_args = argv[1:]
    else:
        args = build_parser().parse_args(argv)  # a bad command line exits here (status 2)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "bench":
        args.threads = _take_threads(args.bench_args)
    if args.command in ("generate", "serve", "bench"):  # the commands that run the model
        # XLA reads its thread count when JAX creates the CPU backend: before anything touches devices.
        threads.apply(args.threads, getattr(args, "cpu_devices", None))
    commands = {
        "generate": generate, "serve": serve, "plan": plan, "download": download, "convert": convert, "bench": bench
    }
    try:
        return commands[args.command](args)
    except (CheckpointError, FileNotFoundError, ValueError) as err:  # ShardingError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ChannelError as err:  # a pod's processes that cannot start together
        print(f"error: {err}", file=sys.stderr)
        return 1


def _take_threads(bench_args: list[str]) -> int | None:
    """`--threads N` (or `--threads=N`) taken out of bench's flags, which go on to the benchmark."""
    value, rest, given = None, [], iter(bench_args)
    for arg in given:
        if arg == "--threads":
            value = next(given, None)
            if value is None:
                build_parser().error("argument --threads: expected one argument")
        elif arg.startswith("--threads="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    bench_args[:] = rest
    if value is None:
        return None
    try:
        return POSITIVE(value)
    except argparse.ArgumentTypeError as err:
        build_parser().error(f"argument --threads: {err}")


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated token ids, e.g. 5,6,7") from None
    return ids


def _check_layout_flags(args: argparse.Namespace) -> None:
    """--rules and --mesh (against the rules' axes) checked before anything slow starts."""
    rules = load_rules(args.rules) if args.rules is not None else None
    if args.mesh is not None:
        parse_mesh(args.mesh, rules)


def _checkpoint_and_config(args: argparse.Namespace) -> tuple[Path | None, GrokConfig]:
    """The checkpoint the flags name, else the one in checkpoints/, else None (the demo); and its config."""
    checkpoint = args.checkpoint
    if checkpoint is None and Path("checkpoints").is_dir():
        checkpoint = find_checkpoint_dir("checkpoints")  # safetensors/, else ckpt-0/, else ckpt/
    return checkpoint, load_config(args.config) if checkpoint is not None else DEMO_CONFIG


DEFAULT_CACHE_LEN = 8192  # Grok-1's whole context; Grok-2 was trained at it (its 131,072 need --cache-len)


def _cache_len(cache_len: int | None, config: GrokConfig) -> int:
    """--cache-len, checked against the config (default: its sequence_len, at most DEFAULT_CACHE_LEN)."""
    if cache_len is None:
        return min(config.sequence_len, DEFAULT_CACHE_LEN)
    if cache_len > config.sequence_len:
        raise ValueError(f"--cache-len must be in 1..{config.sequence_len} (the config's sequence_len), got {cache_len}")
    return cache_len


def _api_key(flag: str | None, env: str) -> str | None:
    """--api-key, else $`env`: the key /v1 requests must send, or None for none. An empty key is an error,
    not a way to turn authentication off (leave both unset for that)."""
    key, source = (flag, "--api-key") if flag is not None else (os.environ.get(env), f"${env}")
    if key is not None and not key.strip():
        raise ValueError(f"{source} is empty: give a key, or leave it unset to serve without authentication")
    return key


def _load_model(args: argparse.Namespace, prompt_ids_given: bool = False) -> Grok:
    """The model the flags describe: a checkpoint (sharded) or the demo, after starting jax.distributed."""
    cpu_format = WEIGHT_FORMATS[args.weight_format]
    checkpoint, config = _checkpoint_and_config(args)
    sharded = checkpoint is not None or args.mesh is not None or args.rules is not None
    try:
        distributed.initialize(
            args.coordinator, args.num_processes, args.process_id, args.cpu_devices, args.distributed
        )
    except RuntimeError as err:
        raise ValueError(f"could not start the distributed run: {str(err).strip().splitlines()[0]}") from None
    # Only from here on may JAX touch devices.
    lead = jax.process_index() == 0
    sharder = None
    if sharded:
        rules, shape = choose_layout(config, jax.device_count(), args.rules, args.mesh)
        sharder = Sharder(rules, mesh_of(shape))
    elif jax.process_count() > 1:
        # The demo's single-device path would leave the other processes without a device to run on;
        # its 2 key/value heads do not split over most meshes, so keep the whole model on every device.
        sharder = Sharder(load_rules("replicated"), make_mesh())
    if sharder is not None:
        log.info(
            "mesh %s, %d process(es), rules %s", mesh_text(dict(sharder.mesh.shape)), jax.process_count(),
            sharder.rules.source,
        )
        if cpu_format and sharder.mesh.size > 1:
            raise ValueError(f"--weight-format cpu needs a single device; this mesh has {sharder.mesh.size}")
    if checkpoint is None:
        with tempfile.TemporaryDirectory() as tmp:
            if lead:
                print(
                    f"No checkpoint given and none at {DEFAULT_CHECKPOINT}: running the built-in demo, a small "
                    "Grok-shaped model with RANDOM weights (its output is meaningless) and a byte-level tokenizer."
                )
            directory = write_demo_checkpoint(Path(tmp) / "ckpt-0")
            return Grok.from_checkpoint(directory, DEMO_CONFIG, ByteTokenizer(), sharder, lead, cpu_format,
                                        args.heartbeat_timeout, args.quantize == "int8")
    tokenizer = args.tokenizer
    if tokenizer is None and not prompt_ids_given:
        tokenizer = DEFAULT_TOKENIZER
    log.info("loading %s with config %s", checkpoint, args.config)
    return Grok.from_checkpoint(checkpoint, args.config, tokenizer, sharder, lead, cpu_format, args.heartbeat_timeout,
                                args.quantize == "int8")


def _follow(model: Grok) -> int:
    """A pod's follower: run the leader's device calls until it stops, then leave the run."""
    model.follow()
    jax.distributed.shutdown()
    return 0


def _close(model: Grok) -> None:
    """A pod's leader: stop the followers, then leave the run (nothing on one process)."""
    if model.pod is not None:
        model.close()
        jax.distributed.shutdown()


def generate(args: argparse.Namespace) -> int:
    # Everything that needs no devices is checked first, so bad flags fail before anything slow.
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    prompt = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else args.prompt
    _check_layout_flags(args)
    model = _load_model(args, prompt_ids_given=args.prompt_ids is not None)
    if jax.process_index() > 0:
        return _follow(model)
    result = model.generate(prompt, max_new_tokens=args.max_new_tokens, sampling=sampling)
    _close(model)
    print(f"Prompt: {args.prompt}" if args.prompt_ids is None else f"Prompt ids: {prompt}")
    if result.text is not None:
        print(f"Output: {result.text}")
    print(f"Token ids: {result.token_ids}")
    print(f"({len(result.token_ids)} tokens, finished by {result.finish_reason})")
    return 0


def serve(args: argparse.Namespace) -> int:
    from grok.server import lifecycle  # the HTTP stack is only imported when serving

    _check_layout_flags(args)
    api_key = _api_key(args.api_key, lifecycle.API_KEY_ENV)
    # A bad file: "FILE: what is wrong", at once. By default the preset's own (Grok-2's), else plain.
    chat_template = ChatTemplate.load(args.chat_template or PRESET_TEMPLATES.get(str(args.config)))
    args.cache_len = _cache_len(args.cache_len, _checkpoint_and_config(args)[1])  # before the slow part
    model = _load_model(args)
    if jax.process_index() > 0:  # no HTTP server, no scheduler: the leader's calls only
        return _follow(model)
    engine = Engine(model, max_batch=args.max_batch, cache_len=args.cache_len, scheduling=_scheduling(args, model))
    if engine.prefix_cache is not None:
        log.info("prefix cache: %d blocks of %d tokens (%.0f MB)", engine.prefix_cache.capacity,
                 engine.prefix_cache.block_size, engine.scheduling.prefix_cache_bytes / 1e6)
    log.info("serving %s on http://%s:%d (API key %s)", args.model_name, args.host, args.port,
             "required" if api_key else "not required")
    lifecycle.serve(engine, args.host, args.port, args.model_name, api_key, args.max_queue,
                    chat_template=chat_template)
    _close(model)
    return 0


def _scheduling(args: argparse.Namespace, grok: Grok) -> Scheduling:
    """serve's scheduling flags; the prefix cache's default memory is a share of the KV cache's."""
    config = grok.config
    if args.prefix_cache_mb is None:
        cache_len = args.cache_len
        nbytes = default_bytes(config, args.max_batch, cache_len, grok.sharder.cache_heads(config), cache_dtype())
    else:
        nbytes = int(args.prefix_cache_mb * 1e6)
    return Scheduling(prefill_budget=args.prefill_budget, prefix_cache_bytes=nbytes,
                      speculate=args.speculate, speculate_max_batch=args.speculate_max_batch)


def plan(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    cache_len = _cache_len(args.cache_len, config)
    rules = load_rules(args.rules) if args.rules is not None else None
    devices = args.cpu_devices or (math.prod(parse_mesh(args.mesh, rules).values()) if args.mesh else 8)
    target = TARGETS[args.target]
    rules, shape = choose_layout(config, devices, args.rules, args.mesh)
    if target.platform == "cpu":
        distributed.initialize(None, None, None, devices, "off")
        mesh, where = mesh_of(shape), f"{devices} devices (virtual CPU devices; compiling takes under a minute)"
    else:
        use_cpu_backend()
        mesh = target.mesh(shape, rules.axes)
        where = f"{devices} x {target.description}, compiled by its own compiler with no device present"
    print(f"Planning {args.config} on {where}...", flush=True)
    prefix = None if args.prefix_cache_mb is None else int(args.prefix_cache_mb * 1e6)
    result = make_plan(config, Sharder(rules, mesh), args.batch, cache_len, prefix_cache_bytes=prefix, target=target,
                       weights=args.weights)
    print(result.describe())
    if args.json:
        print(result.to_json())
    return 0


def download(args: argparse.Namespace) -> int:
    from grok.checkpoint import hub

    config = load_config(args.config or ("grok-2" if args.repo.rstrip("/").endswith("grok-2") else "grok-1"))
    directory = hub.download(args.repo, args.local_dir, args.revision, args.endpoint)
    hub.verify_download(args.local_dir, config)
    tokenizer = hub.GROK2_TOKENIZER_FILE if directory == args.local_dir else hub.TOKENIZER_FILE
    print(f"Complete checkpoint in {directory}, tokenizer in {args.local_dir / tokenizer}")
    return 0


def convert(args: argparse.Namespace) -> int:
    from grok.checkpoint.convert import convert as convert_checkpoint

    output = convert_checkpoint(args.checkpoint, args.output, load_config(args.config), quantize=args.quantize == "int8")
    print(f"Converted {args.checkpoint} to safetensors{' (int8)' if args.quantize else ''} in {output}")
    return 0


def bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "bench" / "bench_engine.py"
    if not script.is_file():
        raise FileNotFoundError(f"benchmark script {script} not found (it ships with the repository)")
    sys.argv = [str(script), *args.bench_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0
