"""What the leader-to-follower channel costs a decode step: the same requests on the same mesh
(`tensor_parallel`, model=4) three ways, measured in one run:

- pod: 2 processes x 2 CPU devices, process 0 leading and process 1 replaying its calls over the
  channel (`grok.serving.pod`);
- lockstep: the same 2 processes x 2 devices without the channel, each scheduling the same
  requests alike (all submitted at once, a fixed prefill budget: the schedule does not depend on
  timing), as many-process `generate` ran before the pod; the baseline for the channel's cost;
- one process with 4 devices (no collectives between processes).

Each configuration runs in its own processes (this file with --worker): it loads the model, warms
the engine up (every program compiled), then generates --batch greedy requests of --prompt-len
token ids and --new-tokens tokens together. Measured on the leader: every decode step's start
(the time between two is the step time), and for the pod every message it sends (its bytes and the
time `send` took); on the follower, the time each message arrived (both processes read the same
monotonic clock). Reported over the steps where every row decodes:

- step time (p50) of both configurations, and the pod's / the single process's;
- leader-to-follower latency per decode message, from the start of `send` to its arrival (p50, p99);
- time the leader spends in `send` per step, and bytes sent per decode step;
- the channel's cost: the pod's step time / lockstep's (target: at most 2% more, under 1 ms).

On CPU, collectives between processes (gloo over TCP) cost far more than within one, so the one
process's step time shows what the pod pays for being several processes, not for the channel.

    PYTHONPATH=. .venv/bin/python bench/bench_multihost.py                     # the grok-1gb model
    PYTHONPATH=. .venv/bin/python bench/bench_multihost.py --model demo --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MESH = {"data": 1, "model": 4}
WARM_STEPS = 4  # decode steps left out at the start (rows still joining)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("demo", "grok-1gb"), default="grok-1gb")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", nargs=6, metavar=("CHECKPOINT", "CONFIG", "COORDINATOR", "PROCESSES", "ID", "MODE"),
                   help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    directory, config_path, coordinator, processes, process, mode = args.worker
    processes, process = int(processes), int(process)
    from grok.parallel import channel, distributed, wire

    devices = 4 // processes
    if processes > 1:
        distributed.initialize(coordinator, processes, process, local_device_count=devices)
    else:
        distributed.initialize(None, None, None, local_device_count=devices)
    from grok.model.config import load_config
    from grok.parallel.sharding import Sharder, load_rules, mesh_of
    from grok.serving import pod
    from grok.serving.api import Grok, SamplingParams
    from grok.serving.engine import Engine, Request, Scheduling

    if mode == "lockstep":  # no channel: every process schedules for itself
        pod.join = lambda *args: None

    received: list[tuple[dict, float]] = []
    if process > 0 and mode == "pod":  # note each frame's arrival, as the follower's reader takes it off the socket
        receive = channel.recv_frame

        def recording(sock):
            frame = receive(sock)
            received.append((frame, time.monotonic()))
            return frame

        channel.recv_frame = recording
    config = load_config(config_path)
    grok = Grok.from_checkpoint(directory, config, sharder=Sharder(load_rules("tensor_parallel"), mesh_of(MESH)),
                                progress=False)
    if process > 0 and mode == "pod":
        grok.follow()
        arrivals = []
        for frame, at in received:
            message = wire.decode(frame)
            if message.get("op") == "call":
                arrivals.append({"executor": message["executor"], "seq": message["seq"], "at": at})
        args.out.write_text(json.dumps({"arrivals": arrivals}))
        return

    sent = []
    if grok.pod is not None:
        send = grok.pod.send

        def recording_send(message: bytes) -> None:
            start = time.monotonic()
            send(message)
            sent.append((message, start, time.monotonic()))

        grok.pod.send = recording_send
    engine = Engine(grok, max_batch=args.batch, cache_len=args.prompt_len + args.new_tokens + 8,
                    scheduling=Scheduling(prefill_budget=args.prompt_len))  # no timing-dependent choice
    engine.warm_up()
    steps = []
    decode = engine.executor.decode

    def timed_decode(*call_args):
        steps.append(time.monotonic())
        return decode(*call_args)

    engine.executor.decode = timed_decode
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config.vocab_size, (args.batch, args.prompt_len)).tolist()
    sent.clear()
    engine.generate([Request(p, args.new_tokens, SamplingParams(temperature=0)) for p in prompts])
    steps.append(time.monotonic())
    grok.close()
    if process > 0:
        return
    messages = []
    for message, start, end in sent:
        header = wire.decode(message)
        if header.get("call") == "decode":
            messages.append({"executor": header["executor"], "seq": header["seq"], "start": start, "end": end,
                             "bytes": len(message) + 8})
    args.out.write_text(json.dumps({"steps": steps, "sent": messages}))


# ----------------------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: argparse.Namespace, directory: Path, config: Path, processes: int, mode: str, tmp: Path) -> list[dict]:
    """Run one configuration; each process's records (the leader's and, in a pod, the follower's)."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GROK_", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    outs = [tmp / f"{mode}-{processes}-{i}.json" for i in range(processes)]
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(directory), str(config), coordinator, str(processes), str(i), mode,
             "--out", str(outs[i]), "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
             "--new-tokens", str(args.new_tokens)],
            env=env, stderr=subprocess.PIPE, text=True,
        )
        for i in range(processes)
    ]
    for i, process in enumerate(workers):
        _, stderr = process.communicate(timeout=3600)
        if process.returncode:
            raise SystemExit(f"worker {i} of {processes} failed ({process.returncode}):\n{stderr[-3000:]}")
    return [json.loads(out.read_text()) for out in outs if out.exists()]


def checkpoint(model: str, tmp: Path) -> tuple[Path, Path]:
    if model == "grok-1gb":
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_serving import grok_1gb_checkpoint

        return grok_1gb_checkpoint()
    from grok.checkpoint.demo import DEMO_CONFIG, write_demo_checkpoint

    config = tmp / "demo.json"
    config.write_text(DEMO_CONFIG.to_json())
    return write_demo_checkpoint(tmp / "ckpt-0"), config


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        directory, config = checkpoint(args.model, tmp)
        print(f"{args.model}: {args.batch} requests of {args.prompt_len} prompt tokens, {args.new_tokens} new tokens, "
              f"mesh data=1,model=4, tensor_parallel", flush=True)
        single = run(args, directory, config, 1, "pod", tmp)[0]
        lockstep = run(args, directory, config, 2, "lockstep", tmp)[0]
        leader, follower = run(args, directory, config, 2, "pod", tmp)

    def step_times(steps):
        return np.diff(steps)[WARM_STEPS:-1]  # the last interval ends after the final step's results

    single_steps, pod_steps = step_times(single["steps"]), step_times(leader["steps"])
    lockstep_steps = step_times(lockstep["steps"])
    arrivals = {(a["executor"], a["seq"]): a["at"] for a in follower["arrivals"]}
    sends = leader["sent"][WARM_STEPS:]
    latency = [arrivals[(m["executor"], m["seq"])] - m["start"] for m in sends]
    send_time = [m["end"] - m["start"] for m in sends]
    result = {
        "single_step_ms": 1e3 * percentile(single_steps, 50),
        "lockstep_step_ms": 1e3 * percentile(lockstep_steps, 50),
        "pod_step_ms": 1e3 * percentile(pod_steps, 50),
        "latency_p50_ms": 1e3 * percentile(latency, 50),
        "latency_p99_ms": 1e3 * percentile(latency, 99),
        "send_p50_ms": 1e3 * percentile(send_time, 50),
        "bytes_per_step": float(np.mean([m["bytes"] for m in sends])),
        "steps": len(pod_steps),
    }
    result["pod_over_lockstep"] = result["pod_step_ms"] / result["lockstep_step_ms"]
    result["pod_over_single"] = result["pod_step_ms"] / result["single_step_ms"]
    result["send_share"] = result["send_p50_ms"] / result["pod_step_ms"]
    print(f"decode step p50 over {result['steps']} steps: pod {result['pod_step_ms']:.2f} ms, lockstep (2 processes, "
          f"no channel) {result['lockstep_step_ms']:.2f} ms: the channel adds "
          f"{100 * (result['pod_over_lockstep'] - 1):+.1f}% ({result['pod_step_ms'] - result['lockstep_step_ms']:+.3f} ms; "
          "target <= 2% and < 1 ms)")
    print(f"  1 process x 4 devices {result['single_step_ms']:.2f} ms (the pod takes {result['pod_over_single']:.2f}x: "
          "gloo collectives between processes)")
    print(f"leader -> follower latency per decode message: p50 {result['latency_p50_ms']:.3f} ms, "
          f"p99 {result['latency_p99_ms']:.3f} ms; {result['bytes_per_step']:.0f} bytes per step")
    print(f"time in send per step: p50 {result['send_p50_ms']:.3f} ms = {100 * result['send_share']:.2f}% of "
          "the pod's step")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
