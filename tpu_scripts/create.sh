#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice.   TPU_NAME=... ZONE=... ACCELERATOR=v4-32 tpu_scripts/create.sh [--spot] [--dry-run]
source "$(dirname "$0")/common.sh"
EXTRA=()
for a in "${ARGS[@]:-}"; do [ "$a" = "--spot" ] && EXTRA+=(--spot); done
run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
  --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${EXTRA[@]}"
