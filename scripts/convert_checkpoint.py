#!/usr/bin/env python3
"""Convert a released AudioCLIP ``.pt`` checkpoint to ``.safetensors``, verified bit for bit.

python scripts/convert_checkpoint.py AudioCLIP-Full-Training.pt OUT.safetensors [--per-tower]

The converter lives in ``audioclip_serve.convert`` (its docstring says what is checked).
"""

import sys

from audioclip_serve.convert import main

if __name__ == "__main__":
    sys.exit(main())
