"""Serving benchmark: open-loop, Poisson-timed streamed completions against `run.py serve` over HTTP.

For each server configuration (a set of extra `run.py serve` flags) the benchmark starts
`python run.py serve` on a free loopback port, waits for `/health` to answer 200 (it answers 503
"loading" while the engine's programs compile), sends one warm-up request, then for each offered
rate sends requests whose inter-arrival times are exponential with mean 1/rate, on schedule
whatever the server's progress (open loop), for `--duration` seconds or `--num-requests` requests,
waits a bounded time for the stragglers, and finally stops the server with SIGTERM. Every request
streams (`"stream": true`); its time to first token (TTFT) is the arrival of its first token chunk
minus the time it was sent, its inter-token latencies (ITL) the gaps between successive token
chunks (pooled over all requests for the percentiles). Completed requests/s and output tokens/s
are over the wall time from the rate's start to its last request's end. Errors: HTTP statuses
other than 200 (429 queue full, 503, ...), error events in a stream, transport errors and timeouts,
and requests still running when the straggler bound ran out.

Prompts are token ids (no tokenizer involved) from a seeded RNG, the same for every configuration:
`--prompt-len` tokens, of which the first `--shared-prefix` are the same in every request (what a
prefix cache would reuse).

Models (`--model`): `demo`, the built-in random demo (run.py's default without a checkpoint); or
`grok-1gb`, the ~1.1 GB Grok-shaped random 8-bit model of bench/bench_engine.py (D=2048, 2
layers, 8 experts, ffn 10928, 16/4 heads x 128, vocab 8192), written once to
`$GROK_CACHE_DIR/bench/` (default `~/.cache/grok/bench/`) and served with `--tokenizer bytes`.

    PYTHONPATH=. .venv/bin/python bench/bench_serving.py --rates 0.5 1 2 --duration 30
    PYTHONPATH=. .venv/bin/python bench/bench_serving.py --model grok-1gb --rates 0.2 --max-tokens 8 \\
        --duration 60
    # several switch sets, each measured at each rate, in one table:
    PYTHONPATH=. .venv/bin/python bench/bench_serving.py --rates 1 4 \\
        --config-set base='' --config-set batch16='--max-batch 16' --json serving.json
    # an already running server (one configuration only):
    PYTHONPATH=. .venv/bin/python bench/bench_serving.py --url http://127.0.0.1:8000 --label mine
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("demo", "grok-1gb")
FIRST_ID = 3  # prompt ids start above pad (0) and eos (2)
HEALTH_POLL_S = 0.5


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def _positive_rate(text: str) -> float:
    rate = float(text)
    if not (rate > 0):
        raise argparse.ArgumentTypeError(f"a rate must be > 0 (or inf), got {text}")
    return rate


def _config_set(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME='FLAGS', got {text!r}")
    shlex.split(flags)  # unbalanced quotes are an error now, not after a server has started
    return name.strip(), flags


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    g = p.add_argument_group("server")
    g.add_argument("--model", choices=MODELS, default="demo", help="what the started server serves (default: demo)")
    g.add_argument("--url", help="benchmark this already running server instead of starting one (one configuration)")
    g.add_argument("--model-name", default="grok-1", help="the model id sent in requests (default: grok-1)")
    g.add_argument("--api-key", help="sent as `Authorization: Bearer KEY` (with --url)")
    g.add_argument("--server-args", default="", help="extra flags appended to every started `run.py serve`")
    g.add_argument(
        "--config-set", action="append", type=_config_set, default=[], metavar="NAME='FLAGS'",
        help="a server configuration: its label and its extra `run.py serve` flags (after --server-args); "
        "repeat it to measure each configuration at each rate (default: one, named by --label)",
    )
    g.add_argument("--label", help="the label of the single configuration (default: its --server-args, or 'default')")
    g.add_argument("--max-batch", type=int, default=8, help="`run.py serve --max-batch` (default: 8)")
    g.add_argument(
        "--cache-len", type=int,
        help="`run.py serve --cache-len` (default: prompt-len + max-tokens rounded up to a multiple of 64, at most "
        "the model's context)",
    )
    g.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for /health 200 (default: 900)")
    g.add_argument("--stop-timeout", type=float, default=60, help="seconds to wait for the server to exit (default: 60)")
    g.add_argument("--server-log", type=Path, help="directory for the servers' logs (default: a temporary one)")
    w = p.add_argument_group("load")
    w.add_argument("--rates", type=_positive_rate, nargs="+", default=[0.5, 1.0],
                   help="offered request rates, requests/s; inf sends --num-requests at once (default: 0.5 1)")
    w.add_argument("--duration", type=float, default=30, help="seconds of arrivals per rate (default: 30)")
    w.add_argument("--num-requests", type=int, help="at most this many requests per rate (default: no limit)")
    w.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default: 64)")
    w.add_argument("--shared-prefix", type=int, default=0, help="leading prompt tokens common to all requests")
    w.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default: 32)")
    w.add_argument("--temperature", type=float, help="sent with each request (default: the server's, 1)")
    w.add_argument("--vocab", type=int, help="prompt ids are drawn from 3..vocab-1 (default: the model's vocabulary)")
    w.add_argument("--seed", type=int, default=0, help="seed of arrival times, prompts and sampling (default: 0)")
    w.add_argument("--warmup", type=int, default=1, help="unmeasured requests before each configuration's rates")
    w.add_argument("--drain-timeout", type=float, default=120,
                   help="seconds to wait for unfinished requests after the last arrival (default: 120)")
    w.add_argument("--request-timeout", type=float, default=300,
                   help="a request fails when the server is silent this long (default: 300)")
    p.add_argument("--json", type=Path, help="also write every number (and every request's timings) to this file")
    p.add_argument("--write-grok-1gb", type=Path, help=argparse.SUPPRESS)  # worker: write the checkpoint here
    args = p.parse_args(argv)

    if args.write_grok_1gb is not None:
        return args
    if args.url and (args.config_set or args.server_args):
        p.error("--url benchmarks a running server: --server-args and --config-set need the benchmark to start it")
    if args.config_set and args.label:
        p.error("--label names the single configuration; with --config-set, each set has its NAME")
    names = [name for name, _ in args.config_set]
    if len(set(names)) != len(names):
        p.error(f"--config-set names must differ: {names}")
    if args.num_requests is not None and args.num_requests < 1:
        p.error("--num-requests must be >= 1")
    if any(math.isinf(r) for r in args.rates) and args.num_requests is None:
        p.error("rate inf needs --num-requests")
    if args.duration <= 0:
        p.error("--duration must be > 0")
    if args.prompt_len < 1 or args.max_tokens < 1:
        p.error("--prompt-len and --max-tokens must be >= 1")
    if not 0 <= args.shared_prefix <= args.prompt_len:
        p.error(f"--shared-prefix must be in 0..{args.prompt_len} (the prompt length)")
    args.vocab = args.vocab or model_config(args.model).vocab_size
    if args.vocab <= FIRST_ID:
        p.error(f"--vocab must be > {FIRST_ID}")
    if args.cache_len is None:
        need = args.prompt_len + args.max_tokens
        args.cache_len = min(-(-need // 64) * 64, model_config(args.model).sequence_len)
    if args.prompt_len >= args.cache_len:
        p.error(f"--prompt-len {args.prompt_len} leaves no room in a context of {args.cache_len} (--cache-len)")
    return args


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@functools.cache
def model_config(model: str):
    """The GrokConfig of a --model: the demo preset, or bench_engine.py's default model at
    vocabulary 8,192 (as before its default became Grok-1's 131,072; its --cache-len, 1024, as
    sequence_len). Imports grok (and so JAX), but initializes no device."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if model == "demo":
        from grok.model.config import PRESETS

        return PRESETS["demo"]
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_engine  # noqa: E402

    return bench_engine.make_config(bench_engine.parse_args(["--vocab", "8192"]))


def cache_root() -> Path:
    return Path(os.environ.get("GROK_CACHE_DIR", Path.home() / ".cache" / "grok")) / "bench"


def grok_1gb_checkpoint() -> tuple[Path, Path]:
    """(checkpoint dir, config JSON) of the grok-1gb model, written once (in a child process)."""
    text = model_config("grok-1gb").to_json()
    directory = cache_root() / f"grok-1gb-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    config, ckpt, done = directory / "config.json", directory / "ckpt-0", directory / "COMPLETE"
    if not done.is_file():
        if ckpt.exists():  # a write that was interrupted: start again
            for f in ckpt.iterdir():
                f.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        config.write_text(text)
        log(f"writing the grok-1gb random checkpoint (~1.1 GB) to {ckpt} (once) ...")
        start = time.monotonic()
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, __file__, "--write-grok-1gb", str(ckpt)], check=True, env=env, timeout=1800)
        done.write_text("ok\n")
        log(f"  written in {time.monotonic() - start:.0f} s")
    return ckpt, config


def write_grok_1gb(ckpt: Path) -> None:
    from grok.checkpoint import pickles
    from grok.model import weights

    pickles.write_checkpoint(weights.random_params(model_config("grok-1gb"), seed=0), ckpt, progress=False)


def model_flags(model: str) -> list[str]:
    if model == "demo":
        return []  # run.py's demo: no checkpoint in checkpoints/ (the default tokenizer is byte-level)
    ckpt, config = grok_1gb_checkpoint()
    return ["--checkpoint", str(ckpt), "--config", str(config), "--tokenizer", "bytes"]


# ---------------------------------------------------------------------------------------------
# The server process
# ---------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python run.py serve` with the given flags, on a free loopback port, until `stop`."""

    def __init__(self, flags: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [sys.executable, str(ROOT / "run.py"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                        *flags]
        with log_path.open("w") as out:
            self.proc = subprocess.Popen(self.command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> float:
        """Poll /health until 200; returns the seconds it took. Raises if the server exits or is late."""
        start = time.monotonic()
        deadline = start + timeout
        with httpx2.Client(timeout=5) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return time.monotonic() - start
                except httpx2.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"/health did not answer 200 within {timeout:g} s:\n{self.tail()}")
                time.sleep(HEALTH_POLL_S)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then (after `timeout`) SIGKILL; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"  the server did not exit within {timeout:g} s of SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------
# Workload and one request
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    """One request: times in seconds from the rate's start."""

    index: int
    scheduled: float
    prompt_tokens: int
    sent: float | None = None
    first_token: float | None = None
    end: float | None = None
    output_tokens: int = 0
    itl: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.sent is not None and self.end is not None


def workload(args, rate_index: int, rate: float) -> list[tuple[float, list[int]]]:
    """(arrival time, prompt ids) of every request of one rate: the same for every configuration."""
    rng = random.Random(f"{args.seed}/{rate_index}")
    prefix_rng = random.Random(f"{args.seed}/prefix")  # one shared prefix for the whole run
    prefix = [prefix_rng.randrange(FIRST_ID, args.vocab) for _ in range(args.shared_prefix)]
    limit = args.num_requests if args.num_requests is not None else math.inf
    requests, t = [], 0.0
    while len(requests) < limit:
        if not math.isinf(rate):
            t += rng.expovariate(rate)
            if t >= args.duration:
                break
        rest = [rng.randrange(FIRST_ID, args.vocab) for _ in range(args.prompt_len - args.shared_prefix)]
        requests.append((t, prefix + rest))
    return requests


def request_body(args, ids: list[int], seed: int, max_tokens: int) -> dict:
    body = {"model": args.model_name, "prompt": ids, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "seed": seed}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    return body


async def send(client: httpx2.AsyncClient, url: str, body: dict, record: Record, clock) -> None:
    """Stream one completion into `record` (never raises, except cancellation)."""
    record.sent = clock()
    last = None
    usage_tokens = None
    done = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            record.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                try:
                    message = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = text[:200]
                record.error = f"HTTP {response.status_code}: {message}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = clock()
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = f"stream error: {event['error'].get('message')}"
                    return
                if event.get("usage"):
                    usage_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or ():  # one token per chunk (no stop strings are sent)
                    record.output_tokens += 1
                    if last is None:
                        record.first_token = now
                    else:
                        record.itl.append(now - last)
                    last = now
                    record.finish_reason = choice.get("finish_reason") or record.finish_reason
        if not done:
            record.error = "the stream ended without [DONE]"
        elif usage_tokens is not None:
            record.output_tokens = usage_tokens
    except httpx2.TimeoutException:
        record.error = "timeout (the server was silent too long)"
    except httpx2.HTTPError as err:
        record.error = f"{type(err).__name__}: {err}"
    except (ValueError, KeyError, TypeError) as err:
        record.error = f"bad event: {err}"
    except asyncio.CancelledError:  # still running when the straggler bound ran out
        record.error = "unfinished: still running when the wait for stragglers ended"
        raise
    finally:
        record.end = clock()


async def run_rate(args, url: str, headers: dict, rate_index: int, rate: float) -> tuple[list[Record], float]:
    """Send one rate's requests on schedule; returns their records and the wall time (first arrival
    clock start to the last request's end)."""
    requests = workload(args, rate_index, rate)
    records = [Record(i, t, len(ids)) for i, (t, ids) in enumerate(requests)]
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx2.Timeout(args.request_timeout, connect=30)
    loop = asyncio.get_running_loop()
    async with httpx2.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        start = loop.time()
        clock = lambda: loop.time() - start  # noqa: E731

        async def one(record: Record, ids: list[int]) -> None:
            await asyncio.sleep(max(0.0, record.scheduled - clock()))
            seed = (args.seed * 1_000_003 + rate_index * 100_003 + record.index) % (1 << 32)
            await send(client, url, request_body(args, ids, seed, args.max_tokens), record, clock)

        tasks = [asyncio.create_task(one(r, ids)) for r, (_, ids) in zip(records, requests)]
        last_arrival = requests[-1][0] if requests else 0.0
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=last_arrival + args.drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for record in records:
            if record.sent is None:  # cancelled before its time came (the client fell far behind)
                record.error = "not sent: cancelled before its arrival time"
        wall = max([r.end for r in records if r.end is not None], default=0.0)
    return records, wall


async def warm_up(args, url: str, headers: dict) -> None:
    """Unmeasured requests of the workload's shape, one after another (a fresh server's first
    requests may do one-off work)."""
    warm = argparse.Namespace(**{**vars(args), "num_requests": args.warmup})
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(args.request_timeout, connect=30), headers=headers) as client:
        for i, (_, ids) in enumerate(workload(warm, -1, math.inf)):
            record = Record(-1, 0.0, len(ids))
            await send(client, url, request_body(args, ids, i, min(args.max_tokens, 4)), record, time.monotonic)
            if record.error:
                raise RuntimeError(f"the warm-up request failed: {record.error}")


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (NumPy's default); None for no values."""
    if not values:
        return None
    values = sorted(values)
    x = (len(values) - 1) * q / 100
    lo = math.floor(x)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (x - lo)


def summarize(label: str, flags: str, rate: float, records: list[Record], wall: float) -> dict:
    ok = [r for r in records if r.ok]
    ttft = [r.first_token - r.sent for r in ok if r.first_token is not None]
    itl = [gap for r in ok for gap in r.itl]
    e2e = [r.end - r.sent for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    lateness = [r.sent - r.scheduled for r in records if r.sent is not None]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            kind = r.error.split(":")[0] if r.error else "unknown"
            errors[kind] = errors.get(kind, 0) + 1
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731

    def stats(values: list[float]) -> dict:
        mean = sum(values) / len(values) if values else None
        return {"p50": ms(percentile(values, 50)), "p99": ms(percentile(values, 99)), "mean": ms(mean)}
    return {
        "label": label, "server_args": flags, "rate": rate, "sent": len(records), "completed": len(ok),
        "errors": len(records) - len(ok), "error_kinds": errors, "wall_s": wall,
        "completed_per_s": len(ok) / wall if wall > 0 else None,
        "output_tokens": tokens, "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "ttft_ms": stats(ttft), "itl_ms": stats(itl), "e2e_ms": stats(e2e),
        "send_lateness_ms_max": ms(max(lateness, default=0.0)),
        "requests": [dataclasses.asdict(r) for r in records],
    }


def table(rows: list[dict]) -> str:
    head = ["label", "rate (req/s)", "sent", "completed req/s", "output tok/s", "TTFT p50 (ms)", "TTFT p99 (ms)",
            "ITL p50 (ms)", "ITL p99 (ms)", "errors"]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for r in rows:
        cells = [r["label"], "inf" if math.isinf(r["rate"]) else f"{r['rate']:g}", str(r["sent"]),
                 f(r["completed_per_s"], ".2f"), f(r["output_tokens_per_s"], ".1f"), f(r["ttft_ms"]["p50"], ".0f"),
                 f(r["ttft_ms"]["p99"], ".0f"), f(r["itl_ms"]["p50"], ".0f"), f(r["itl_ms"]["p99"], ".0f"),
                 str(r["errors"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def measure(args, label: str, flags: str, url: str, headers: dict, rows: list[dict]) -> None:
    if args.warmup:
        asyncio.run(warm_up(args, url, headers))
    for i, rate in enumerate(args.rates):
        what = f"{args.num_requests} requests at once" if math.isinf(rate) else f"arrivals for up to {args.duration:g} s"
        log(f"  [{label}] rate {rate:g} req/s: {what} ...")
        records, wall = asyncio.run(run_rate(args, url, headers, i, rate))
        row = summarize(label, flags, rate, records, wall)
        rows.append(row)
        log(f"    {row['completed']}/{row['sent']} completed in {wall:.1f} s, {row['errors']} errors "
            f"{row['error_kinds'] or ''}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.write_grok_1gb is not None:
        write_grok_1gb(args.write_grok_1gb)
        return 0
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.config_set:
        configs = args.config_set
    else:
        configs = [(args.label or args.server_args.strip() or "default", "")]
    rows: list[dict] = []
    started = {}
    log(f"workload: prompts of {args.prompt_len} tokens ({args.shared_prefix} shared), max_tokens {args.max_tokens}, "
        f"rates {args.rates} req/s, {args.duration:g} s"
        + (f" / {args.num_requests} requests" if args.num_requests else "") + " each")
    if args.url:
        measure(args, configs[0][0], "", args.url.rstrip("/"), headers, rows)
    else:
        base = model_flags(args.model) + ["--max-batch", str(args.max_batch), "--cache-len", str(args.cache_len),
                                          "--model-name", args.model_name]
        log_dir = args.server_log or Path(tempfile.mkdtemp(prefix="bench_serving_"))
        log_dir.mkdir(parents=True, exist_ok=True)
        for label, own in configs:
            flags = " ".join(f for f in (args.server_args.strip(), own.strip()) if f)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
            server = Server(base + shlex.split(flags), log_dir / f"server-{safe}.log")
            log(f"[{label}] starting: {shlex.join(server.command)}  (log: {server.log_path})")
            try:
                ready = server.wait_ready(args.startup_timeout)
                log(f"  ready in {ready:.0f} s")
                started[label] = {"command": server.command, "ready_s": ready}
                measure(args, label, flags, server.url, headers, rows)
            finally:
                status = server.stop(args.stop_timeout)
                log(f"  server stopped (exit status {status})")
    limit = f"{args.duration:g} s" + (f" or {args.num_requests} requests" if args.num_requests else "")
    served = args.url or (f"{args.model} model, run.py serve --max-batch {args.max_batch} --cache-len {args.cache_len}"
                          " + each label's flags")
    print(f"\n{served}; prompts of {args.prompt_len} tokens ({args.shared_prefix} shared), max_tokens "
          f"{args.max_tokens}, {limit} of arrivals per rate\n")
    print(table(rows))
    if not args.url:
        print("\n" + "; ".join(f"{label}: {shlex.join(shlex.split(' '.join((args.server_args, own)))) or '(no flags)'}"
                               for label, own in configs))
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "servers": started, "results": rows}, indent=1))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
