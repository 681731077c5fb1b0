"""Ahead-of-time compile time of the Grok-1 decode step, by number of layers.

Builds the real grok-1 config (optionally with fewer layers) as abstract, sharded inputs, lowers
and compiles one decode step (`apply(params, token [B, 1], memory)`, memory donated as in
`grok.serving.api`) for a (data, model) mesh of virtual CPU devices, and prints a table. No weight is
ever allocated. With the layers run as one scan, the time should not grow with depth.

    PYTHONPATH=. python bench/compile_time.py --layers 16 64 --rules tensor_parallel --mesh-model 8
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 64], help="layer counts to compile")
    parser.add_argument("--rules", default="tensor_parallel", help="partition rules name or .toml path")
    parser.add_argument("--mesh-data", type=int, default=1, help="size of the data axis")
    parser.add_argument("--mesh-model", type=int, default=8, help="size of the model axis")
    parser.add_argument("--batch", type=int, default=1, help="sequences per decode step")
    parser.add_argument("--cache-len", type=int, default=1024, help="KV-cache length")
    parser.add_argument("--repeat", type=int, default=1, help="compiles per layer count (the minimum is shown)")
    args = parser.parse_args(argv)
    if min(args.layers) < 1 or args.mesh_data < 1 or args.mesh_model < 1 or args.repeat < 1:
        parser.error("layer counts, mesh sizes and --repeat must be positive")
    if args.batch % args.mesh_data:
        parser.error(f"--batch {args.batch} must be divisible by --mesh-data {args.mesh_data}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    devices = args.mesh_data * args.mesh_model
    # Virtual CPU devices must be requested before JAX is imported.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    import jax

    from grok.model.config import PRESETS
    from grok.parallel.sharding import Sharder, load_rules, make_mesh
    from grok.planning.aot import compile_decode

    sharder = Sharder(load_rules(args.rules), make_mesh(args.mesh_data, args.mesh_model))

    def compile_once(num_layers: int) -> tuple[float, float, int]:
        config = PRESETS["grok-1"].replace(num_layers=num_layers)
        compiled, _, lower_s, compile_s = compile_decode(config, sharder, args.batch, args.cache_len)
        instructions = sum(1 for line in compiled.as_text().splitlines() if " = " in line)
        return lower_s, compile_s, instructions

    print(
        f"grok-1 decode step, rules {args.rules}, mesh (data={args.mesh_data}, model={args.mesh_model}) of "
        f"virtual CPU devices, batch {args.batch}, cache {args.cache_len}, jax {jax.__version__}"
    )
    print(f"{'layers':>6}  {'lower s':>8}  {'compile s':>9}  {'HLO instructions':>16}")
    compile_once(2)  # untimed warm-up: the first compile in a process also initialises XLA's backend
    compile_seconds = {}
    for num_layers in args.layers:
        runs = [compile_once(num_layers) for _ in range(args.repeat)]
        lower_s = min(r[0] for r in runs)
        compile_s = min(r[1] for r in runs)
        compile_seconds[num_layers] = compile_s
        print(f"{num_layers:>6}  {lower_s:>8.2f}  {compile_s:>9.2f}  {runs[0][2]:>16}")
    if 16 in compile_seconds and 64 in compile_seconds:
        print(f"compile time ratio 64 / 16 layers: {compile_seconds[64] / compile_seconds[16]:.2f}")


if __name__ == "__main__":
    main()
