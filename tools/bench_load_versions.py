"""Time ``load_adapter`` of randlora-core at two source trees, side by side in one run.

The hostile-input work put checks in front of every load (header first, sizes against the model,
finiteness after the cast); this measures whether a valid checkpoint loads any slower for it.
Each measurement is a fresh process that imports one tree (``spec/src`` and
``packages/randlora-core/src`` put first on ``sys.path``), builds the same Llama-shaped model and
times one ``load_adapter``; the two trees alternate round by round so that the machine's load
falls on both alike. The checkpoints are written once by the older tree, since files of format
v1 must load in both.

    python tools/bench_load_versions.py --old ../old-checkout --new . --rounds 7 --out bench/results/x.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
from torch import nn
from randlora_core import RandLoraConfig, get_randlora_model, load_adapter, save_adapter

D, F, LAYERS = {d}, {f}, {layers}
names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
sizes = {{"q_proj": (D, D), "k_proj": (D, D // 4), "v_proj": (D, D // 4), "o_proj": (D, D),
          "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}}
torch.manual_seed(0)
model = nn.ModuleList()
for _ in range(LAYERS):
    block = nn.Module()
    for name in names:
        setattr(block, name, nn.utils.skip_init(nn.Linear, *sizes[name], bias=False))
    model.append(block)
mode, path, save_projection = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if mode == "save":
    cfg = RandLoraConfig(r={r}, target_modules=names, save_projection=save_projection, projection_prng_key=5)
    rl = get_randlora_model(model, cfg)
    save_adapter(rl, path)
else:
    start = time.perf_counter()
    load_adapter(model, path)
    print(json.dumps(time.perf_counter() - start))
"""


def _child(tree: Path, script: str, *args: str) -> str:
    """Run ``script`` in a fresh interpreter that imports randlora from ``tree``."""
    paths = [str(tree / "spec" / "src"), str(tree / "packages" / "randlora-core" / "src")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def main() -> None:
    """Write checkpoints with the old tree, then time loads with both trees in alternating rounds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="checkout of the older source tree")
    parser.add_argument("--new", type=Path, default=Path("."), help="checkout of the newer source tree")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--f", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--out", type=Path, help="markdown report to write")
    args = parser.parse_args()
    script = CHILD.format(d=args.d, f=args.f, layers=args.layers, r=args.r)
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stored in (True, False):
            path = str(Path(tmp) / f"adapter-{int(stored)}.safetensors")
            _child(trees["old"], script, "save", path, "1" if stored else "0")
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    times[name].append(json.loads(_child(tree, script, "load", path, "0")))
            old, new = statistics.median(times["old"]), statistics.median(times["new"])
            size = Path(path).stat().st_size / 2**20
            rows.append(f"| {'stored' if stored else 'regenerated'} | {size:.1f} | {old:.3f} | {new:.3f} | {new / old:.2f} |")
    load = os.getloadavg()
    lines = [
        "# load_adapter: older vs newer source tree",
        "",
        f"Llama-shaped model, {args.layers} layers, d={args.d}, ffn={args.f}, all 7 linear layers, r={args.r};",
        f"{args.rounds} alternating rounds, one fresh process per load; load average at the end {load[0]:.1f}.",
        f"old: `{trees['old']}`, new: `{trees['new']}`.",
        "",
        "| bases | file MiB | old median s | new median s | new / old |",
        "|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
