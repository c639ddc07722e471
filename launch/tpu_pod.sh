#!/usr/bin/env bash
# Runs beit3_jax on every host of a Cloud TPU VM slice (one process per host, the pjit model),
# from a workstation with gcloud. A pod run, start to finish:
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 [PROJECT=my-project]
#   bash launch/tpu_pod.sh create      # the TPU VM slice (SPOT=1 for a spot one)
#   bash launch/tpu_pod.sh setup       # `git archive HEAD` of this checkout to ~/beit3_jax on
#                                      # every host, then launch/setup_venv.sh tpu there
#   RUN_NAME=run1 bash launch/tpu_pod.sh run beit3_jax.main \
#       --config=configs/pretrain/base.py --workdir=gs://my-bucket/run1
#   bash launch/tpu_pod.sh logs        # follow host 0's newest log (--worker=N for another)
#   bash launch/tpu_pod.sh stop        # end the beit3_jax processes on every host
#   bash launch/tpu_pod.sh delete      # the slice; it bills until deleted
#
# `run` starts the same command on every host at once, `python -m MODULE ARGS` in ~/beit3_jax,
# with BEIT3_JAX_DISTRIBUTED=1, in the background under nohup (it survives the ssh session), its
# output in ~/beit3_jax/logs/<RUN_NAME, or a UTC timestamp>.log on each host. beit3_jax.main calls
# jax.distributed.initialize() when BEIT3_JAX_DISTRIBUTED=1 or when it detects more than one
# process, so the hosts join one JAX program. Every host must see the same files: give --workdir
# and the data dir as gs:// paths, never a host's local disk. After a preemption (or `stop`),
# `run` with the same arguments resumes from the workdir's latest checkpoint.
#
# Environment: TPU_NAME, ZONE (required); PROJECT (default: gcloud's); ACCELERATOR_TYPE (v4-8);
# TPU_VERSION (tpu-ubuntu2204-base); SPOT=1 (create a spot slice); RUN_NAME (the log's name).
# `--dry-run` before the subcommand prints each command (`+ ` and the quoted words, one a line)
# and runs nothing; without it each command is echoed to stderr the same way before it runs.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: bash launch/tpu_pod.sh [--dry-run] SUBCOMMAND
  create                 create the TPU VM slice (ACCELERATOR_TYPE, TPU_VERSION, SPOT=1)
  setup                  copy `git archive HEAD` to ~/beit3_jax on all hosts and install it
  run MODULE [ARGS...]   start `python -m MODULE ARGS` on all hosts in the background
  logs [--worker=N]      follow the newest log on host N (default 0; RUN_NAME picks a log)
  stop                   end the `python -m beit3_jax...` processes on all hosts
  delete                 delete the slice
environment: TPU_NAME, ZONE (required); PROJECT, ACCELERATOR_TYPE, TPU_VERSION, SPOT, RUN_NAME
(the header of launch/tpu_pod.sh walks through a pod run)
EOF
  exit "${1:-2}"
}

dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -h|--help|help) usage 0 ;;
    -*) echo "tpu_pod.sh: unknown option '$1'" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "tpu_pod.sh: no subcommand" >&2; usage; }
sub="$1"; shift
case "$sub" in
  create|setup|run|logs|stop|delete) ;;
  *) echo "tpu_pod.sh: unknown subcommand '$sub'" >&2; usage ;;
esac
case "$sub" in
  run|logs) ;;
  *) [ $# -eq 0 ] || { echo "tpu_pod.sh: $sub takes no arguments" >&2; usage; } ;;
esac
for var in TPU_NAME ZONE; do
  if [ -z "${!var:-}" ]; then
    echo "tpu_pod.sh: set $var, e.g. export TPU_NAME=my-v4-32 ZONE=us-central2-b" >&2
    usage
  fi
done

if [[ -n "${RUN_NAME:-}" && ! "$RUN_NAME" =~ ^[A-Za-z0-9._=,+-]+$ ]]; then
  echo "tpu_pod.sh: RUN_NAME may hold only letters, digits and ._=,+- (it names a log file)" >&2
  usage
fi

# --zone and --project, for every gcloud command (never empty, so safe under `set -u`).
where=(--zone "$ZONE")
[ -n "${PROJECT:-}" ] && where+=(--project "$PROJECT")
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
remote_dir='~/beit3_jax'   # expanded by the shell on each host

# One word, quoted for a POSIX shell only when it needs it (the rules of Python's shlex.quote).
quote() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    local sq="'\\''"
    printf "'%s'" "${1//\'/$sq}"
  fi
}

# Prints `+ COMMAND`; runs it unless --dry-run.
x() {
  local line="+" word
  for word in "$@"; do line+=" $(quote "$word")"; done
  if [ "$dry_run" = 1 ]; then
    printf '%s\n' "$line"
  else
    printf '%s\n' "$line" >&2
    "$@"
  fi
}

ssh_to() {  # ssh_to WORKER COMMAND: run COMMAND on host WORKER (a number, or `all`)
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker="$1" --command "$2"
}

case "$sub" in
  create)
    spot=()
    [ "${SPOT:-0}" = 1 ] && spot=(--spot)
    x gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
      --accelerator-type "${ACCELERATOR_TYPE:-v4-8}" --version "${TPU_VERSION:-tpu-ubuntu2204-base}" \
      ${spot[@]+"${spot[@]}"}
    ;;

  setup)
    if [ "$dry_run" = 1 ]; then
      archive="${TMPDIR:-/tmp}/beit3_jax.tar.gz"
    else
      tmp="$(mktemp -d)"
      trap 'rm -rf "$tmp"' EXIT
      archive="$tmp/beit3_jax.tar.gz"
      if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
        echo "tpu_pod.sh: note: uncommitted changes are not copied (git archive HEAD)" >&2
      fi
    fi
    x git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    x gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":beit3_jax.tar.gz "${where[@]}" \
      --worker=all
    ssh_to all "mkdir -p $remote_dir && tar -xzf ~/beit3_jax.tar.gz -C $remote_dir && \
rm ~/beit3_jax.tar.gz && bash $remote_dir/launch/setup_venv.sh tpu"
    ;;

  run)
    [ $# -ge 1 ] || { echo "tpu_pod.sh: run needs a MODULE, e.g. run beit3_jax.main" >&2; usage; }
    module="$1"; shift
    log="logs/${RUN_NAME:-$(date -u +%Y%m%d-%H%M%S)}.log"  # the same name on every host
    command="$(printf %q "$module")"
    [ $# -gt 0 ] && command+="$(printf ' %q' "$@")"
    ssh_to all "cd $remote_dir && mkdir -p logs && \
{ BEIT3_JAX_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=3 nohup .venv/bin/python -m $command \
> $log 2>&1 < /dev/null & } && echo \"\$(hostname): started; log: $remote_dir/$log\""
    ;;

  logs)
    worker=0
    for arg in "$@"; do
      case "$arg" in
        --worker=*) worker="${arg#--worker=}" ;;
        *) echo "tpu_pod.sh: logs takes only --worker=N" >&2; usage ;;
      esac
    done
    [[ "$worker" =~ ^[0-9]+$ ]] || { echo "tpu_pod.sh: --worker=N needs a number" >&2; usage; }
    if [ -n "${RUN_NAME:-}" ]; then
      pick="log=$remote_dir/logs/$RUN_NAME.log"
    else
      pick="log=\$(ls -t $remote_dir/logs/*.log 2>/dev/null | head -n 1)"
    fi
    ssh_to "$worker" "$pick; [ -f \"\$log\" ] || { echo \"no log in $remote_dir/logs\" >&2; \
exit 1; }; echo \"== \$log\"; tail -n 200 -f \"\$log\""
    ;;

  stop)
    # [p]ython: the pattern does not match the command line of the shell that runs pkill.
    ssh_to all "pkill -f '[p]ython -m beit3_jax' && echo \"\$(hostname): stopped\" \
|| echo \"\$(hostname): nothing running\""
    ;;

  delete)
    x gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
esac
