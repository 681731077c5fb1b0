"""Checkpoint load time: release pickles vs the converted safetensors format.

Writes random weights for a Grok-shaped config (about 300 MB with the defaults) as release pickles,
converts them (`grok.checkpoint.convert`), then times, for each format:
- host: `read_checkpoint`, every weight into host memory as NumPy arrays;
- sharded: `loader.load_sharded` in this process onto a (data, model) mesh of virtual CPU devices
  (tensor_parallel over 8 devices by default), until the arrays are ready;
- N processes: the same sharded load done by `--processes` processes together (`jax.distributed`
  on localhost, each with its share of the devices), as on a multi-host machine: each process
  needs only its own shards. Timed from a common start to the last process done.
Prints the best and median of `--repeat` runs of each, and the ratio pickle / safetensors.

By default the files are in the page cache (just written: a warm start). `--cold` asks the kernel
to drop each checkpoint's cached pages before every timed run (`posix_fadvise(DONTNEED)`), so the
reads come from the disk, as on a fresh machine.

    PYTHONPATH=. python bench/load_time.py --emb-size 512 --layers 8 --repeat 5 [--cold] [--processes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("pickle", "safetensors")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emb-size", type=int, default=512, help="model width D (experts are 8 x D x 16D/3 int8)")
    parser.add_argument("--layers", type=int, default=8, help="number of decoder layers")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (fp32 embeddings V x D)")
    parser.add_argument("--rules", default="tensor_parallel", help="partition rules for the sharded loads")
    parser.add_argument("--mesh-data", type=int, default=1, help="size of the data axis")
    parser.add_argument("--mesh-model", type=int, default=8, help="size of the model axis")
    parser.add_argument("--processes", type=int, default=4, help="processes of the multi-process load (0: skip it)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per format and kind of load")
    parser.add_argument("--cold", action="store_true", help="drop the files from the page cache before each run")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON job of one process of the multi-process load
    args = parser.parse_args(argv)
    if min(args.emb_size, args.layers, args.vocab_size, args.mesh_data, args.mesh_model, args.repeat) < 1:
        parser.error("sizes, mesh axes and --repeat must be positive")
    devices = args.mesh_data * args.mesh_model
    if args.processes < 0 or (args.processes and devices % args.processes):
        parser.error(f"--processes must divide the {devices} devices of the mesh")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    devices = args.mesh_data * args.mesh_model
    # Virtual CPU devices must be requested before JAX is imported.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(ROOT))

    import jax

    from grok.checkpoint import loader, pickles
    from grok.checkpoint.convert import convert
    from grok.checkpoint.read import read_checkpoint
    from grok.model import weights
    from grok.model.config import GrokConfig
    from grok.parallel.sharding import Sharder, load_rules, make_mesh

    config = GrokConfig(
        emb_size=args.emb_size, key_size=64, num_q_heads=8, num_kv_heads=8, num_layers=args.layers,
        vocab_size=args.vocab_size, widening_factor=8, attn_output_multiplier=0.125, num_experts=8,
        num_selected_experts=2, embedding_multiplier_scale=args.emb_size**0.5, output_multiplier_scale=3**-0.5,
        pad_token=0, eos_token=2, sequence_len=256,
    )
    sharder = Sharder(load_rules(args.rules), make_mesh(args.mesh_data, args.mesh_model))

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        dirs = {"pickle": root / "ckpt-0", "safetensors": root / "safetensors"}
        params = weights.random_params(config, seed=0)
        size = sum(x.nbytes for x in jax.tree.leaves(params))
        start = time.perf_counter()
        pickles.write_checkpoint(params, dirs["pickle"], progress=False)
        written = time.perf_counter() - start
        del params
        start = time.perf_counter()
        convert(dirs["pickle"], dirs["safetensors"], config, progress=False)
        converted_in = time.perf_counter() - start
        print(
            f"config: D={config.emb_size}, {config.num_layers} layers, V={config.vocab_size}: "
            f"{size / 1e6:.0f} MB of weights in {len(os.listdir(dirs['pickle']))} files; "
            f"pickles written in {written:.1f} s, converted in {converted_in:.1f} s"
        )
        print(f"mesh: {args.mesh_data}x{args.mesh_model} virtual CPU devices, rules {args.rules}, "
              f"{'cold' if args.cold else 'warm'} page cache, {os.cpu_count()} CPU cores")

        def host_load(directory):
            read_checkpoint(directory, config, progress=False)

        def sharded_load(directory):
            jax.block_until_ready(loader.load_sharded(directory, config, sharder, progress=False))

        print(f"{'load':<12} {'format':<12} {'best s':>8} {'median s':>9} {'GB/s':>6}")
        for kind, load in (("host", host_load), ("sharded", sharded_load)):
            for fmt in FORMATS:
                load(dirs[fmt])  # warm-up: compiles the sharded load's update functions
            times = {fmt: [] for fmt in FORMATS}
            for _ in range(args.repeat):
                for fmt in FORMATS:  # alternate, so both see the same machine state
                    if args.cold:
                        evict(dirs[fmt])
                    start = time.perf_counter()
                    load(dirs[fmt])
                    times[fmt].append(time.perf_counter() - start)
            report(kind, times, size)
        if args.processes:
            config_file = root / "config.json"
            config_file.write_text(config.to_json())
            job = {
                "config": str(config_file), "dirs": {fmt: str(d) for fmt, d in dirs.items()}, "rules": args.rules,
                "mesh": [args.mesh_data, args.mesh_model], "repeat": args.repeat, "cold": args.cold,
                "processes": args.processes,
            }
            report(f"{args.processes} processes", run_workers(job), size)


def report(kind: str, times: dict[str, list[float]], size: int) -> None:
    for fmt in FORMATS:
        best, median = min(times[fmt]), statistics.median(times[fmt])
        print(f"{kind:<12} {fmt:<12} {best:>8.2f} {median:>9.2f} {size / 1e9 / best:>6.2f}")
    ratio = min(times["pickle"]) / min(times["safetensors"])
    median_ratio = statistics.median(times["pickle"]) / statistics.median(times["safetensors"])
    print(f"{kind:<12} ratio pickle / safetensors: {ratio:.2f}x (best), {median_ratio:.2f}x (median)")


def evict(directory: Path) -> None:
    """Ask the kernel to drop the cached pages of every file in `directory` (they were fsynced when written)."""
    for path in directory.iterdir():
        with open(path, "rb") as file:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


# ------------------------------------------------------------------------------------ many processes


def run_workers(job: dict) -> dict[str, list[float]]:
    """Run the multi-process load: one worker per process; a run's time is the slowest worker's."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROK_")}
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).strip()
    env.pop("XLA_FLAGS", None)
    if flags:
        env["XLA_FLAGS"] = flags
    env["PYTHONPATH"] = str(ROOT)
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps({**job, "id": i, "coordinator": f"127.0.0.1:{port}"})],
            env=env, stdout=subprocess.PIPE, text=True,
        )
        for i in range(job["processes"])
    ]
    results = []
    for process in workers:
        out, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            raise SystemExit(f"a worker failed with exit code {process.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {fmt: [max(r[fmt][i] for r in results) for i in range(job["repeat"])] for fmt in FORMATS}


def worker(job: dict) -> None:
    """One process of the multi-process load: prints {format: [seconds per run]} as its last line."""
    sys.path.insert(0, str(ROOT))
    from grok.parallel import distributed

    data, model = job["mesh"]
    distributed.initialize(job["coordinator"], job["processes"], job["id"], data * model // job["processes"])

    import jax
    from jax.experimental import multihost_utils

    from grok.checkpoint import loader
    from grok.model.config import load_config
    from grok.parallel.sharding import Sharder, load_rules, make_mesh

    config = load_config(job["config"])
    sharder = Sharder(load_rules(job["rules"]), make_mesh(data, model))

    def load(fmt: str) -> None:
        jax.block_until_ready(loader.load_sharded(job["dirs"][fmt], config, sharder, progress=False))

    for fmt in FORMATS:
        load(fmt)  # warm-up
    times = {fmt: [] for fmt in FORMATS}
    for run in range(job["repeat"]):
        for fmt in FORMATS:
            if job["cold"] and job["id"] == 0:
                evict(Path(job["dirs"][fmt]))
            multihost_utils.sync_global_devices(f"start {fmt} {run}")  # all processes start together
            start = time.perf_counter()
            load(fmt)
            times[fmt].append(time.perf_counter() - start)
    multihost_utils.sync_global_devices("done")
    print(json.dumps(times))


if __name__ == "__main__":
    main()
