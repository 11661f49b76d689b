#!/usr/bin/env bash
# Run the same `jaxcl run CONFIG [overrides]` on every host of the slice (multi-host: each host joins
# jax.distributed automatically on TPU).   tpu_scripts/run.sh configs/tpu/pod_demo.yaml train.steps=1000 [--dry-run]
source "$(dirname "$0")/common.sh"
if [ "${#ARGS[@]}" -lt 1 ]; then echo "usage: $0 CONFIG [key=value ...] [--dry-run]" >&2; exit 2; fi
CMD="cd ~/$REPO_DIR && nohup python3 -m jaxcl.cli run"
for a in "${ARGS[@]}"; do CMD+=" $(printf '%q' "$a")"; done
CMD+=" > ~/jaxcl.log 2>&1 &"
ENVS="export JAX_COMPILATION_CACHE_DIR=\${JAX_COMPILATION_CACHE_DIR:-~/.cache/jax}; export LIBTPU_INIT_ARGS=\"${LIBTPU_INIT_ARGS:-}\";"
tpu_ssh all "$ENVS $CMD"
