#!/usr/bin/env bash
# Fetch a released AudioCLIP checkpoint into .cache/ with progress and resume, then verify its sha256.
# Usage: scripts/download_checkpoint.sh FILE SHA256
set -euo pipefail
file=$1 sha=$2
url="https://github.com/AndreyGuzhov/AudioCLIP/releases/download/v0.1/${file}"
dest="$(cd "$(dirname "$0")/.." && pwd)/.cache"
mkdir -p "$dest"
target="$dest/$file"
if [ -f "$target" ] && echo "$sha  $target" | sha256sum --check --status; then
  echo "$file: already present and verified"; exit 0
fi
echo "downloading $url -> $target"
if ! curl --fail --location --continue-at - --progress-bar --output "$target.part" "$url"; then
  echo "error: could not download $file (offline, or the release is unreachable)." >&2
  echo "       The offline demo needs no download: make demo" >&2
  exit 1
fi
if ! echo "$sha  $target.part" | sha256sum --check --status; then
  echo "error: $file has the wrong sha256 (expected $sha); removed it, run again to re-download." >&2
  rm -f "$target.part"; exit 1
fi
mv "$target.part" "$target"
echo "$file: downloaded and verified (sha256 $sha)"
