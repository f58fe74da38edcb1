"""Peak host memory while loading a full-size Kosmos-2.5 checkpoint (random weights, Hub layout).

    python benchmarks/load_memory.py --dir /tmp/kosmos25-random --dtype bfloat16

Writes the checkpoint once (fp32, two shards, the released tensor names; ~5.5 GB, no download),
then loads it in a fresh process and reports the peak resident memory (VmHWM) against the size of
the loaded weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from kosmos_cli.models import kosmos2_5
from kosmos_cli.models.config import Kosmos25Config
from kosmos_cli.models.loading import rename


def write_checkpoint(out: Path) -> None:
    """Random fp32 tensors under the checkpoint's names, split into two shards with an index."""
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = kosmos2_5.Kosmos25(Kosmos25Config())
    arch = kosmos2_5.ARCHITECTURE
    back = [(new, old) for old, new in arch.checkpoint_names], [(new, old) for old, new in arch.checkpoint_leaf_names]
    params = [(rename(name, *back), p.shape) for name, p in model.named_parameters()]
    half, seen, shards = sum(s.numel() for _, s in params) // 2, 0, ([], [])
    for name, shape in params:
        shards[seen >= half].append((name, shape))
        seen += shape.numel()
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({name: torch.randn(shape) * 0.02 for name, shape in shard}, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({"model_type": "kosmos-2.5", "text_config": {}, "vision_config": {}}))


MEASURE = """
import sys, torch
from pathlib import Path
from kosmos_cli.engine import read_config
from kosmos_cli.models.loading import load_weights
status = lambda key: int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) / 1024
path, dtype = Path(sys.argv[1]), getattr(torch, sys.argv[2])
arch, config = read_config(path)
with torch.device('meta'):
    model = arch.module(config)
base = status('VmRSS')
load_weights(model, path, arch.checkpoint_names, arch.checkpoint_leaf_names, dtype=dtype,
             device=torch.device('cpu'), ignore=('text_model.lm_head.',))
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
peak = status('VmHWM')
print(f'{sys.argv[2]}: weights {weights:.0f} MiB; RSS before loading {base:.0f} MiB, peak {peak:.0f} MiB; '
      f'growth {(peak - base) / weights:.3f}x the weights, peak {peak / weights:.3f}x')
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if not (args.dir / "model.safetensors.index.json").exists():
        write_checkpoint(args.dir)
    subprocess.run([sys.executable, "-c", MEASURE, str(args.dir), args.dtype], check=True)


if __name__ == "__main__":
    main()
