"""Zip the application for a Ray ``runtime_env`` ``working_dir``: nodes that do not have the project
installed get its code from the zip when ``serve deploy`` rolls it out.

    python scripts/package_app.py                     # -> dist/audioclip-serve-app.zip
    python scripts/package_app.py -o /shared/app.zip

Ray takes a zip with one top-level folder whose contents become each replica's working directory.
Put it where every node can read it (S3/GCS, an HTTPS server, or the same path on each node) and name
it in the config's ``runtime_env.working_dir`` (``configs/cluster.yaml``). Entries are sorted and
timestamp-free, so the same code makes the same zip (and Ray caches it by URI).
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("audioclip", "deployments", "audioclip_serve", "configs", "serve_config.yaml", "pyproject.toml")
TOP = "audioclip-serve"


def files() -> list[Path]:
    found = []
    for part in PARTS:
        path = ROOT / part
        found += [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sorted(p for p in found if "__pycache__" not in p.parts and p.suffix != ".pyc")


def package(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files():
            info = zipfile.ZipInfo(
                f"{TOP}/{path.relative_to(ROOT).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0)
            )
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "dist" / "audioclip-serve-app.zip")
    args = parser.parse_args()
    print(package(args.output))


if __name__ == "__main__":
    main()
