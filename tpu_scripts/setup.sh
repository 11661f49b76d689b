#!/usr/bin/env bash
# Copy this checkout to every worker and install jaxcl with jax[tpu].   tpu_scripts/setup.sh [--dry-run]
source "$(dirname "$0")/common.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
retry 3 gcloud compute tpus tpu-vm scp --recurse "$ROOT" "$TPU_NAME":~/"$REPO_DIR" --zone="$ZONE" $PROJECT_FLAG --worker=all
tpu_ssh all "cd ~/$REPO_DIR && python3 -m pip install -U pip && python3 -m pip install -e '.[tpu]'"
