"""Serving throughput of the AudioCLIP Serve app, measured against the raw in-process towers in one run.

1. Inputs are generated deterministically: short queries (5-15 tokens) and sentences (30-60 tokens);
   640x480 JPEG photos and large 4000x3000 JPEGs (smooth gradients + a blob + noise, Pillow, quality
   90); 5 s and 30 s WAV clips (44.1 kHz int16, tones + noise).
2. Raw: each tower alone in this process, built by the replicas' own ``audioclip.factory.build_tower``
   from the config's settings (device, dtype, NHWC / folded BatchNorm, torch threads), on synthetic
   "demo" weights, timed at batch 1 and at the largest of 32 and 8 whose call fits ``--raw-max-call``
   seconds; decoding included: the config's pipelines (``audioclip.pipeline``) decode each item as the
   router does, then collate and run the forwards as the tower does, so raw runs the served code.
3. Served: ``serve run`` of ``--config`` (a temp copy on a free port) unless ``--url`` names a running app.
   Load comes from separate processes: an aiohttp client (HTTP) and a Ray driver (handle API), closed
   loop at each concurrency, with single-item and multi-item requests. A case issues requests until
   ``--seconds`` have passed or ``--max-requests`` were issued, then waits for those in flight, so the
   next case starts on an idle server; throughput = items answered / (last answer - start). A case
   whose first wave alone would take over ``--max-case-seconds`` at the best raw rate, or whose body would
   exceed the app's 64 MiB limit, is skipped and reported as such.
4. Reported per case: requests/s, items/s, p50/p90/p99 latency, the mean batch the tower formed
   (its ``stats()`` before and after), CPU use (utime+stime of every process in /proc over wall time:
   cores busy, also split by role, and CPU ms per answered request in each process of the cluster),
   and ratios to raw. Then the performance targets, met or missed.

Markdown tables go to stdout, progress to stderr; ``--json`` and ``--plot`` write the figures. The code
is the package ``audioclip_serve.bench``.

    .venv/bin/python scripts/bench.py --json docs/bench_serving.json --plot docs/bench_serving.png
    .venv/bin/python scripts/bench.py --quick          # ~4 min smoke run
    .venv/bin/python scripts/bench.py --url http://127.0.0.1:8000 --ray-address auto   # a running app
"""

import sys

from audioclip_serve.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
