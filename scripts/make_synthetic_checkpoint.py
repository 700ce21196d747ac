#!/usr/bin/env python3
"""Write synthetic-v1 AudioCLIP weights in the released checkpoint format (a flat state_dict).

python scripts/make_synthetic_checkpoint.py OUT.pt [--set NAME]
python scripts/make_synthetic_checkpoint.py OUT.safetensors --set demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from audioclip import synthetic_state_dict


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="destination .pt or .safetensors file")
    parser.add_argument("--set", dest="set_name", default="shared", help="weight set name (default: shared)")
    args = parser.parse_args()
    arrays = synthetic_state_dict(args.set_name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(args.out))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, args.out)
    print(f"wrote {len(arrays)} tensors (synthetic-v1, set {args.set_name!r}) to {args.out}")


if __name__ == "__main__":
    main()
