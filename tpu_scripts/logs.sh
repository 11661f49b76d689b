#!/usr/bin/env bash
# Show the last lines of the job log on one worker (default 0).   tpu_scripts/logs.sh [WORKER] [--dry-run]
source "$(dirname "$0")/common.sh"
tpu_ssh "${ARGS[0]:-0}" "tail -n 100 ~/jaxcl.log"
