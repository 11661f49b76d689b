#!/usr/bin/env bash
# Delete the TPU VM / slice.   tpu_scripts/delete.sh [--dry-run]
source "$(dirname "$0")/common.sh"
run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet
