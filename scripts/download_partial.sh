#!/usr/bin/env bash
# The Partial checkpoint (audio head trained; image/text towers are OpenAI CLIP RN50), 537 MB.
exec "$(dirname "$0")/download_checkpoint.sh" AudioCLIP-Partial-Training.pt \
  1921885b6c3b5de0619f2ef4a9700ecbade758a398b34eb064230c30baef0c75
