"""The corpus job against the in-process CLI on this machine, and the driver's memory for a big manifest.

    python scripts/bench_corpus.py --images 96            # throughput: audioclip-embed vs --ray
    python scripts/bench_corpus.py --manifest-entries 100000   # driver peak RSS, 1,000 vs N entries

Throughput runs the same generated photos through ``audioclip-embed images`` in this process's way
(the model in the CLI process) and through ``--ray`` on a local cluster the command starts (one
actor, and the remaining CPU for writing), each as a user runs it; wall time includes each one's
start-up (model build, and for --ray the local cluster), measured in one run. The manifest run lists
paths of files that do not exist: every entry becomes an ``error`` row, so the job's work per entry
is small and what is measured is the driver's memory as the entry count grows (peak RSS of the
``audioclip-embed`` process alone).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of one process now (Linux /proc), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_cli(args: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB of that process alone, sampled every 0.1 s, stderr) of one
    ``audioclip-embed`` run; the Ray processes it starts are not counted."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [str(BIN / "audioclip-embed"), *args, "--no-progress"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        peak = 0
        while proc.poll() is None:
            peak = max(peak, rss_bytes(proc.pid))
            time.sleep(0.1)
        proc.wait()
        err.seek(0)
        stderr = err.read()
    seconds = time.monotonic() - started
    if proc.returncode not in (0, 1):
        raise SystemExit(f"audioclip-embed failed ({proc.returncode}):\n{stderr[-3000:]}")
    return seconds, peak / 2**20, stderr


def photos(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(200, 640, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"p{i:05}.jpg")


def throughput(n: int, work: Path) -> None:
    (work / "in").mkdir()
    photos(work / "in", n)
    local, _, _ = run_cli(
        ["images", str(work / "in"), "-o", str(work / "local.npy"), "--checkpoint", "synthetic:demo"]
    )
    ray, _, err = run_cli(
        ["images", str(work / "in"), "-o", str(work / "out"), "--ray", "--checkpoint", "synthetic:demo"]
    )
    assert f"wrote {n} rows" in err, err[-2000:]
    print(f"| mode | seconds for {n} photos | photos/s |\n|---|--:|--:|")
    print(f"| in-process CLI | {local:.1f} | {n / local:.2f} |")
    print(f"| --ray (local cluster, 1 actor) | {ray:.1f} | {n / ray:.2f} |")
    print(f"ratio --ray / in-process: {local / ray:.2f}")


def manifest_memory(entries: int, work: Path) -> None:
    rows = []
    for count in (1000, entries):
        manifest = work / f"m{count}.txt"
        manifest.write_text("".join(f"/nonexistent/corpus/{i:07}.jpg\n" for i in range(count)))
        seconds, peak, err = run_cli(
            [
                "images",
                str(manifest),
                "-o",
                str(work / f"out{count}"),
                "--ray",
                "--checkpoint",
                "synthetic:demo",
            ]
        )
        assert f"{count} unusable" in err, err[-2000:]
        rows.append((count, seconds, peak))
    print("| manifest entries | job seconds | driver peak RSS MiB |\n|--:|--:|--:|")
    for count, seconds, peak in rows:
        print(f"| {count} | {seconds:.0f} | {peak:.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=0)
    p.add_argument("--manifest-entries", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            throughput(args.images, Path(tmp))
        if args.manifest_entries:
            manifest_memory(args.manifest_entries, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
