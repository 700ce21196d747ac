"""The serving benchmark (``scripts/bench.py``), and the ``serve run`` helper the soak and tests share.

One job per module:

* ``inputs``: the deterministic inputs (text pools, JPEG photos, WAV clips) and their description.
* ``raw``: each tower alone in this process, timed through the served pipelines.
* ``serveapp``: ``free_port``, ``wait_ready`` and ``ServeApp`` (``serve run`` of a config on a free port).
* ``load``: the load processes (HTTP and handle API, closed loop).
* ``meter``: CPU use of every process by role (from /proc), and the towers' batch statistics.
* ``cases``: which served cases run, which are skipped, and running them.
* ``report``: per-case results, ratios to raw, targets, tables, the plot and the run's provenance.
* ``cli``: the command line (``parse_args``, ``main``).
"""
