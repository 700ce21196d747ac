#!/usr/bin/env bash
# The Full checkpoint (all three towers trained on AudioSet), 537 MB.
exec "$(dirname "$0")/download_checkpoint.sh" AudioCLIP-Full-Training.pt \
  2441d35b353352c8b1bbfb8f7c687f46314c3d2909e940eaf763b8c17f632c44
