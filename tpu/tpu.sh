#!/usr/bin/env bash
# Drive a Cloud TPU VM (single host or pod slice) for flaxlora from your workstation.
#
#   tpu/tpu.sh create  --name NAME --zone ZONE [--type v5litepod-8] [--version RUNTIME] [--queued] [--spot]
#   tpu/tpu.sh install --name NAME --zone ZONE     # sync the repo, then tpu/setup.sh on every worker
#   tpu/tpu.sh sync    --name NAME --zone ZONE     # copy this checkout's tracked files to every worker
#   tpu/tpu.sh run     --name NAME --zone ZONE -- [experiments/qqp.py flags]   # on all workers, in the background
#   tpu/tpu.sh logs    --name NAME --zone ZONE [--worker 0]     # follow a worker's run log
#   tpu/tpu.sh fetch   --name NAME --zone ZONE [--dest tpu-runs] # copy runs/ back from worker 0
#   tpu/tpu.sh delete  --name NAME --zone ZONE [--queued]
#
# Every command takes --dry-run: it then prints the exact gcloud commands and runs nothing.
# --project P is passed to gcloud when given (else gcloud's configured project). Settings may
# also come from the environment: TPU_NAME, TPU_ZONE, TPU_PROJECT, TPU_TYPE, TPU_VERSION.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu.sh: error: $*" >&2; exit 2; }

[ $# -ge 1 ] || { usage; exit 2; }
action=$1
shift
case "$action" in
  create | install | sync | run | logs | fetch | delete) ;;
  -h | --help) usage; exit 0 ;;
  *) die "unknown command '$action' (create, install, sync, run, logs, fetch, delete; see --help)" ;;
esac

name=${TPU_NAME:-} zone=${TPU_ZONE:-} project=${TPU_PROJECT:-}
type=${TPU_TYPE:-v5litepod-8} version=${TPU_VERSION:-v2-alpha-tpuv5-lite}
queued=0 spot=0 dry_run=0 worker=0 dest=tpu-runs
run_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --zone) zone=${2:?--zone needs a value}; shift 2 ;;
    --project) project=${2:?--project needs a value}; shift 2 ;;
    --type) type=${2:?--type needs a value}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --worker) worker=${2:?--worker needs a value}; shift 2 ;;
    --dest) dest=${2:?--dest needs a value}; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; run_args=("$@"); break ;;
    *) die "unknown flag '$1' (see --help)" ;;
  esac
done
[ -n "$name" ] || die "--name (or TPU_NAME) is required"
[ -n "$zone" ] || die "--zone (or TPU_ZONE) is required"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name' must be lowercase letters, digits and dashes"
[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker number or 'all', got '$worker'"
if [ "$action" = run ] && [ ${#run_args[@]} -eq 0 ]; then
  die "run needs the experiments/qqp.py flags after --, e.g. -- --model roberta-large --from-hub --mesh data=8"
fi

common=(--zone="$zone")
[ -n "$project" ] && common+=(--project="$project")
root=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=flaxlora  # the checkout on each worker, relative to the home directory
log=flaxlora-run.log

# One shell word, single-quoted when it holds anything but safe characters.
quote() {
  case $1 in
    '' | *[!A-Za-z0-9_./=:,@%+-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# Print the command, ready to paste into a shell (dry run), or run it.
run() {
  if [ "$dry_run" -eq 1 ]; then
    local words=() arg
    for arg in "$@"; do words+=("$(quote "$arg")"); done
    echo "${words[*]}"
  else
    "$@"
  fi
}

ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$1"; }

sync_repo() {
  local archive=/tmp/flaxlora-$name.tar.gz
  run git -C "$root" archive --format=tar.gz --output="$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$name:flaxlora.tar.gz" "${common[@]}" --worker=all
  ssh_all "mkdir -p $remote_dir && tar -xzf flaxlora.tar.gz -C $remote_dir && rm flaxlora.tar.gz"
}

case "$action" in
  create)
    extra=()
    [ "$spot" -eq 1 ] && extra+=(--spot)
    if [ "$queued" -eq 1 ]; then
      run gcloud compute tpus queued-resources create "$name" "${common[@]}" --node-id="$name" \
        --accelerator-type="$type" --runtime-version="$version" "${extra[@]}"
    else
      run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$type" \
        --version="$version" "${extra[@]}"
    fi
    ;;
  sync) sync_repo ;;
  install)
    sync_repo
    ssh_all "cd $remote_dir && bash tpu/setup.sh"
    ;;
  run)
    flags=()
    for arg in "${run_args[@]}"; do flags+=("$(quote "$arg")"); done
    ssh_all "cd $remote_dir && nohup .venv/bin/python experiments/qqp.py --distributed ${flags[*]} > ~/$log 2>&1 < /dev/null &"
    ;;
  logs) run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker="$worker" --command="tail -n 200 -f ~/$log" ;;
  fetch)
    run mkdir -p "$dest"
    run gcloud compute tpus tpu-vm scp --recurse "$name:$remote_dir/runs" "$dest" "${common[@]}" --worker=0
    ;;
  delete)
    if [ "$queued" -eq 1 ]; then
      run gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
    fi
    ;;
esac
