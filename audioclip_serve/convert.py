"""Convert a released AudioCLIP ``.pt`` checkpoint to ``.safetensors``, verified bit for bit.

python scripts/convert_checkpoint.py AudioCLIP-Full-Training.pt OUT.safetensors [--per-tower]
(the entry point of this module)

Why: ``.safetensors`` loads without unpickling and memory-maps cleanly, and per-tower files let a
tower replica read only its own weights. The source must build the full model strictly before
anything is written; every written file is read back and compared tensor by tensor, byte for byte,
with the source, and moved into place only if it matches. Key names stay the checkpoint's, so
``AudioCLIP.from_checkpoint`` reads the output like the original. With ``--per-tower``,
``OUT-image``, ``OUT-text`` and ``OUT-audio.safetensors`` hold one tower each plus the three logit
scales (load them with ``towers=("text",)`` etc.). Prints ``sha256  path`` per file written (the
``sha256sum -c`` format); exits 1 with a message on a checkpoint that does not load strictly or on
any mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from audioclip import TOWERS, AudioCLIP, CheckpointError, read_state_dict
from audioclip.checkpoint import file_sha256, tower_part

StateDict = dict[str, torch.Tensor]


class ConversionError(Exception):
    """The source cannot be converted, or a written file does not match it."""


def load_strict(path: Path) -> StateDict:
    """Read the source and build the full model from it, so a partial or foreign file is refused."""
    try:
        state_dict = read_state_dict(path)
        AudioCLIP.from_state_dict(state_dict)
    except CheckpointError as err:
        raise ConversionError(f"{path} does not load strictly: {err}") from err
    return state_dict


def storable(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Contiguous tensors with no shared storage: safetensors refuses aliased or strided tensors."""
    seen: set[int] = set()
    out: StateDict = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return out


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-pattern equality, so NaNs, -0.0 and every payload compare exactly (``==`` on floats would
    not): both are reinterpreted as integers of the same width."""
    as_int = _SAME_SIZE_INT.get(a.element_size())
    if as_int is None:  # e.g. complex128: no 16-byte integer type; compare the bytes themselves
        return a.numpy().tobytes() == b.numpy().tobytes()
    return torch.equal(a.view(as_int), b.view(as_int))


def compare(written: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]) -> list[str]:
    """Every difference between a reloaded file and the tensors it should hold, one line each."""
    problems = [f"missing key {k}" for k in sorted(set(source) - set(written))]
    problems += [f"unexpected key {k}" for k in sorted(set(written) - set(source))]
    for key in sorted(set(source) & set(written)):
        a, b = written[key], source[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{key}: {a.dtype} {list(a.shape)} != source {b.dtype} {list(b.shape)}")
        elif not bits_equal(a, b):
            problems.append(f"{key}: values differ from the source")
    return problems


def verify(path: Path, source: Mapping[str, torch.Tensor]) -> None:
    """Read ``path`` back and require it to equal ``source`` bit for bit."""
    try:
        written = read_state_dict(path)
    except CheckpointError as err:
        raise ConversionError(f"cannot read back {path}: {err}") from err
    problems = compare(written, source)
    if problems:
        shown = "; ".join(problems[:10]) + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
        raise ConversionError(f"{path} does not match the source: {shown}")


def write_verified(tensors: Mapping[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> str:
    """Write to a temporary file next to ``out``, verify it, then rename: ``out`` is never half-written
    or wrong. Returns the file's sha256."""
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.partial{out.suffix}")
    try:
        save_file(storable(tensors), str(tmp), metadata=metadata)
        verify(tmp, tensors)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(out)


def outputs(out: Path, per_tower: bool) -> list[tuple[Path, str | None]]:
    """The files to write: ``out`` with every key, then ``OUT-<tower>.safetensors`` if asked."""
    files: list[tuple[Path, str | None]] = [(out, None)]
    if per_tower:
        files += [(out.with_name(f"{out.stem}-{t}{out.suffix}"), t) for t in TOWERS]
    return files


def convert(source_path: Path, out: Path, per_tower: bool) -> list[tuple[str, Path]]:
    """Convert and verify; returns ``(sha256, path)`` of every file written."""
    if out.suffix != ".safetensors":
        raise ConversionError(f"the output must end with .safetensors, got {out}")
    state_dict = load_strict(source_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "source": source_path.name, "source_sha256": file_sha256(source_path)}
    written = []
    for path, tower in outputs(out, per_tower):
        tensors = state_dict if tower is None else tower_part(state_dict, tower)
        sha256 = write_verified(tensors, path, {**metadata, "tower": tower or "all"})
        written.append((sha256, path))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="released AudioCLIP .pt checkpoint (a flat state_dict)")
    parser.add_argument("out", type=Path, help="destination .safetensors file")
    parser.add_argument(
        "--per-tower", action="store_true", help="also write OUT-image/-text/-audio.safetensors"
    )
    args = parser.parse_args(argv)
    try:
        written = convert(args.source, args.out, args.per_tower)
    except ConversionError as err:
        print(f"convert_checkpoint: error: {err}", file=sys.stderr)
        return 1
    for sha256, path in written:
        print(f"{sha256}  {path}")
    return 0
