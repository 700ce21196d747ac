"""audioclip.proto and the stubs protoc generates from it (scripts/gen_protos.py; do not edit them)."""
