#!/usr/bin/env bash
# Build a config's token cache on every host of the slice, in the foreground: each host joins
# jax.distributed (automatic on TPU) and tokenizes its share of the corpus with all its cores; process 0
# commits. data.cache must be storage every host sees (a gs:// URL).  Preparing on one VM instead:
#   jaxcl prepare configs/tpu/pod_demo.yaml          (same cache; the pod then only reads it)
#   tpu_scripts/prepare.sh configs/tpu/pod_demo.yaml [key=value ...] [--dry-run]
source "$(dirname "$0")/common.sh"
if [ "${#ARGS[@]}" -lt 1 ]; then echo "usage: $0 CONFIG [key=value ...] [--dry-run]" >&2; exit 2; fi
CMD="cd ~/$REPO_DIR && python3 -m jaxcl.cli prepare"
for a in "${ARGS[@]}"; do CMD+=" $(printf '%q' "$a")"; done
tpu_ssh all "$CMD"
