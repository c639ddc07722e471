#!/usr/bin/env bash
# Runs beit3_jax on every host of a Cloud TPU VM slice (one process per host, the pjit model).
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b [PROJECT=my-project]
#   bash launch/tpu_pod.sh setup                  # copy this checkout to ~/beit3_jax on all
#                                                 # hosts and install it with jax[tpu]
#   bash launch/tpu_pod.sh run beit3_jax.main --config=configs/smoke.py:large
#   bash launch/tpu_pod.sh run beit3_jax.main --config=... --workdir=gs://bucket/run1
#
# `run` starts `python -m <module> <args>` on all hosts at once with BEIT3_JAX_DISTRIBUTED=1,
# so that beit3_jax.main calls jax.distributed.initialize() before touching devices. Workdirs
# and data dirs on a pod should be gs:// paths (every host must see the same files).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
project_flag=()
[ -n "${PROJECT:-}" ] && project_flag=(--project "$PROJECT")
remote_dir='~/beit3_jax'
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" \
    --worker=all --command "$1"
}

case "${1:-}" in
  setup)
    archive="$(mktemp -d)/beit3_jax.tar.gz"
    git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":beit3_jax.tar.gz --zone "$ZONE" \
      "${project_flag[@]}" --worker=all
    on_all_hosts "mkdir -p $remote_dir && tar -xzf beit3_jax.tar.gz -C $remote_dir && \
      bash $remote_dir/launch/setup_venv.sh tpu"
    ;;
  run)
    shift
    [ $# -ge 1 ] || { echo "usage: $0 run MODULE [ARGS...]" >&2; exit 2; }
    module="$1"; shift
    args="$(printf ' %q' "$@")"
    on_all_hosts "cd $remote_dir && BEIT3_JAX_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=3 \
      .venv/bin/python -m $module$args"
    ;;
  *)
    echo "usage: $0 setup | run MODULE [ARGS...]   (see the header of this file)" >&2
    exit 2
    ;;
esac
