# Shared settings and helpers for the Cloud TPU scripts (sourced, not run).
# Every script accepts --dry-run, which prints the exact gcloud commands instead of running them.
set -euo pipefail

TPU_NAME="${TPU_NAME:-jaxcl}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
PROJECT_FLAG="${PROJECT:+--project=$PROJECT}"
REPO_DIR="${REPO_DIR:-jaxcl}"        # where the code lives on every worker (relative to $HOME)
DRY_RUN=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) ARGS+=("$arg") ;;
  esac
done

# run CMD...: print the command (quoted exactly as executed); execute it unless --dry-run.
run() {
  printf '%q ' "$@"; printf '\n'
  if [ "$DRY_RUN" -eq 0 ]; then
    "$@"
  fi
}

# retry N CMD...: multi-host ssh/scp fail transiently; try up to N times.
retry() {
  local n="$1"; shift
  if [ "$DRY_RUN" -eq 1 ]; then run "$@"; return; fi
  local i
  for i in $(seq 1 "$n"); do
    if run "$@"; then return 0; fi
    echo "attempt $i/$n failed; retrying in 10 s" >&2
    sleep 10
  done
  return 1
}

tpu_ssh() {   # tpu_ssh WORKER COMMAND
  retry 3 gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker="$1" --command="$2"
}
