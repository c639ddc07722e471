#!/usr/bin/env bash
# Runs beit3_jax on every host of a Cloud TPU VM slice, or of several slices joined over the
# data-center network (multislice), one process per host (the pjit model), from a workstation
# with gcloud. A pod run, start to finish:
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 [PROJECT=my-project]
#   bash launch/tpu_pod.sh create      # a TPU VM; QUEUED=1 (or SPOT=1, RESERVED=1, NUM_SLICES=N):
#                                      # a queued resource, granted when capacity is free
#   bash launch/tpu_pod.sh status      # the queued resource's state (ACTIVE: ready), or the VM's
#   bash launch/tpu_pod.sh setup       # `git archive HEAD` of this checkout to ~/beit3_jax on
#                                      # every host, then launch/setup_venv.sh tpu there
#   RUN_NAME=run1 bash launch/tpu_pod.sh run beit3_jax.main \
#       --config=configs/pretrain/base.py --workdir=gs://my-bucket/run1
#   bash launch/tpu_pod.sh logs        # follow host 0's newest log (--worker=N, --slice=S)
#   bash launch/tpu_pod.sh stop        # SIGTERM on every host; waits while the trainer saves
#   bash launch/tpu_pod.sh delete      # the queued resource or the TPU VM; it bills until deleted
#
# The runtime image (TPU_VERSION) follows ACCELERATOR_TYPE: v4-* tpu-ubuntu2204-base,
# v5litepod-* (v5e) v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e.
#
# `run` starts the same command on every host at once, `python -m MODULE ARGS` in ~/beit3_jax,
# with BEIT3_JAX_DISTRIBUTED=1, in the background under nohup (it survives the ssh session), its
# output in ~/beit3_jax/logs/<RUN_NAME, or a UTC timestamp>.log on each host. Before that it
# SIGKILLs a `python -m beit3_jax` left running on a host (a stale process holds the TPU) and
# removes /tmp/libtpu_lockfile. beit3_jax.main calls jax.distributed.initialize() when
# BEIT3_JAX_DISTRIBUTED=1, so the hosts join one JAX program. Every host must see the same files:
# give --workdir and the data dir as gs:// paths, never a host's local disk. After a preemption
# (or `stop`), `run` with the same arguments resumes from the workdir's latest checkpoint.
#
# Multislice: NUM_SLICES=N (N > 1) creates N slices of ACCELERATOR_TYPE as one queued resource
# (it implies QUEUED=1), named TPU_NAME-0 ... TPU_NAME-(N-1). setup, run and stop then address
# every host of every slice, and run gives the hosts of slice i the environment JAX's megascale
# runtime reads: MEGASCALE_COORDINATOR_ADDRESS (the internal IP of host 0 of TPU_NAME-0, port
# 8080), MEGASCALE_NUM_SLICES=N, MEGASCALE_SLICE_ID=i, MEGASCALE_PORT=8080.
#
# Environment: TPU_NAME, ZONE (required); PROJECT (default: gcloud's); ACCELERATOR_TYPE (v4-8);
# TPU_VERSION (by ACCELERATOR_TYPE, above); QUEUED=1 (create through a queued resource);
# SPOT=1 or RESERVED=1 (a spot or reserved queued resource; each implies QUEUED=1); NUM_SLICES (1);
# QR_ID (the queued resource, default TPU_NAME-qr); RUN_NAME (the log's name); STOP_TIMEOUT (the
# seconds `stop` waits, 900); FORCE=1 (`stop` SIGKILLs what still runs after STOP_TIMEOUT).
# Give `status`, `delete` and the others the same variables as `create`.
# `--dry-run` before the subcommand prints each command (`+ ` and the quoted words, one a line)
# and runs nothing; without it each command is echoed to stderr the same way before it runs.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: bash launch/tpu_pod.sh [--dry-run] SUBCOMMAND
  create                 create the slice(s): a TPU VM, or a queued resource when QUEUED=1,
                         SPOT=1, RESERVED=1 or NUM_SLICES>1
  status                 describe the queued resource (QR_ID), or the TPU VM
  setup                  copy `git archive HEAD` to ~/beit3_jax on all hosts and install it
  run MODULE [ARGS...]   SIGKILL a leftover `python -m beit3_jax` and remove /tmp/libtpu_lockfile
                         on all hosts, then start `python -m MODULE ARGS` there in the background
  logs [--worker=N] [--slice=S]
                         follow the newest log on host N of slice S (default 0 and 0; RUN_NAME
                         picks a log)
  stop                   SIGTERM the `python -m beit3_jax` processes on all hosts and wait until
                         they exit (STOP_TIMEOUT seconds, 900; then FORCE=1 SIGKILLs them)
  delete                 delete the queued resource with its slices, or the TPU VM
environment: TPU_NAME, ZONE (required); PROJECT; ACCELERATOR_TYPE (v4-8); TPU_VERSION (default
by type: v4-* tpu-ubuntu2204-base, v5litepod-* v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5,
v6e-* v2-alpha-tpuv6e); QUEUED=1; SPOT=1 or RESERVED=1 (imply QUEUED=1); NUM_SLICES=N (N>1:
multislice over slices TPU_NAME-0..N-1; implies QUEUED=1); QR_ID (TPU_NAME-qr); RUN_NAME;
STOP_TIMEOUT; FORCE=1. Give every subcommand the variables `create` had.
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
  create|status|setup|run|logs|stop|delete) ;;
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
num_slices="${NUM_SLICES:-1}"
if [[ ! "$num_slices" =~ ^[1-9][0-9]*$ ]]; then
  echo "tpu_pod.sh: NUM_SLICES=$num_slices: give the number of slices, 1 or more" >&2
  usage
fi
stop_timeout="${STOP_TIMEOUT:-900}"
if [[ ! "$stop_timeout" =~ ^[0-9]+$ ]]; then
  echo "tpu_pod.sh: STOP_TIMEOUT=$stop_timeout: give whole seconds, e.g. STOP_TIMEOUT=1800" >&2
  usage
fi
if [ "${SPOT:-0}" = 1 ] && [ "${RESERVED:-0}" = 1 ]; then
  echo "tpu_pod.sh: SPOT=1 and RESERVED=1 exclude each other; set one" >&2
  usage
fi
# Several slices exist only as one queued resource; spot and reserved capacity is requested
# through one too.
queued=0
if [ "${QUEUED:-0}" = 1 ] || [ "${SPOT:-0}" = 1 ] || [ "${RESERVED:-0}" = 1 ] \
    || [ "$num_slices" -gt 1 ]; then
  queued=1
fi
qr_id="${QR_ID:-$TPU_NAME-qr}"

# The TPU VMs: TPU_NAME, or the slices TPU_NAME-0 ... that --node-prefix TPU_NAME names.
nodes=("$TPU_NAME")
if [ "$num_slices" -gt 1 ]; then
  nodes=()
  for ((i = 0; i < num_slices; i++)); do nodes+=("$TPU_NAME-$i"); done
fi

# --zone and --project, for every gcloud command (never empty, so safe under `set -u`).
where=(--zone "$ZONE")
[ -n "${PROJECT:-}" ] && where+=(--project "$PROJECT")
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
remote_dir='~/beit3_jax'   # expanded by the shell on each host
megascale_port=8080
# The processes `stop` ends and `run` clears, as a quoted pgrep/pkill pattern. [p]ython does
# not match the command line of the remote shell that runs pgrep, which holds the pattern.
match="'[p]ython -m beit3_jax'"

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

ssh_to() {  # ssh_to NODE WORKER COMMAND: run COMMAND on host WORKER (a number, or `all`) of NODE
  x gcloud compute tpus tpu-vm ssh "$1" "${where[@]}" --worker="$2" --command "$3"
}

runtime_version() {  # the runtime image for ACCELERATOR_TYPE, unless TPU_VERSION names one
  if [ -n "${TPU_VERSION:-}" ]; then
    printf '%s' "$TPU_VERSION"; return
  fi
  case "$1" in
    v4-*) printf tpu-ubuntu2204-base ;;
    v5litepod-*) printf v2-alpha-tpuv5-lite ;;
    v5p-*) printf v2-alpha-tpuv5 ;;
    v6e-*) printf v2-alpha-tpuv6e ;;
    *) echo "tpu_pod.sh: no runtime image known for ACCELERATOR_TYPE=$1 (known: v4-*," \
         "v5litepod-*, v5p-*, v6e-*); set TPU_VERSION to its TPU software version" >&2
       usage ;;
  esac
}

case "$sub" in
  create)
    accelerator="${ACCELERATOR_TYPE:-v4-8}"
    version="$(runtime_version "$accelerator")"
    if [ "$queued" = 1 ]; then
      if [ "$num_slices" -gt 1 ]; then
        names=(--node-count "$num_slices" --node-prefix "$TPU_NAME")
      else
        names=(--node-id "$TPU_NAME")
      fi
      tier=()
      [ "${SPOT:-0}" = 1 ] && tier=(--spot)
      [ "${RESERVED:-0}" = 1 ] && tier=(--reserved)
      x gcloud compute tpus queued-resources create "$qr_id" "${names[@]}" \
        --accelerator-type "$accelerator" --runtime-version "$version" "${where[@]}" \
        ${tier[@]+"${tier[@]}"}
      if [ "$dry_run" = 0 ]; then
        echo "tpu_pod.sh: queued resource $qr_id requested; \`bash launch/tpu_pod.sh status\`" \
          "shows its state: run setup once it is ACTIVE" >&2
      fi
    else
      x gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
        --accelerator-type "$accelerator" --version "$version"
    fi
    ;;

  status)
    if [ "$queued" = 1 ]; then
      x gcloud compute tpus queued-resources describe "$qr_id" "${where[@]}"
    else
      x gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}"
    fi
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
    for node in "${nodes[@]}"; do
      x gcloud compute tpus tpu-vm scp "$archive" "$node":beit3_jax.tar.gz "${where[@]}" \
        --worker=all
      ssh_to "$node" all "mkdir -p $remote_dir && tar -xzf ~/beit3_jax.tar.gz -C $remote_dir && \
rm ~/beit3_jax.tar.gz && bash $remote_dir/launch/setup_venv.sh tpu"
    done
    ;;

  run)
    [ $# -ge 1 ] || { echo "tpu_pod.sh: run needs a MODULE, e.g. run beit3_jax.main" >&2; usage; }
    module="$1"; shift
    log="logs/${RUN_NAME:-$(date -u +%Y%m%d-%H%M%S)}.log"  # the same name on every host
    command="$(printf %q "$module")"
    [ $# -gt 0 ] && command+="$(printf ' %q' "$@")"
    if [ "$num_slices" -gt 1 ]; then
      describe=(gcloud compute tpus tpu-vm describe "${nodes[0]}" "${where[@]}"
                --format='value(networkEndpoints[0].ipAddress)')
      if [ "$dry_run" = 1 ]; then
        x "${describe[@]}"
        coordinator_ip=COORDINATOR_IP
      else
        coordinator_ip="$(x "${describe[@]}")"
        if [[ ! "$coordinator_ip" =~ ^[0-9A-Fa-f.:]+$ ]]; then
          echo "tpu_pod.sh: no internal IP for host 0 of ${nodes[0]} (got '$coordinator_ip');" \
            "is the queued resource ACTIVE? (bash launch/tpu_pod.sh status)" >&2
          exit 1
        fi
      fi
    fi
    # Runs before the start on each host. The started command reads "$py" rather than the
    # python path, so that this shell's own command line never matches the pattern.
    clear_leftovers="if pgrep -f $match > /dev/null; then \
pgrep -af $match | while read -r found; do \
echo \"\$(hostname): warning: killing a leftover process (it holds the TPU): \$found\" >&2; done; \
pkill -KILL -f $match; \
for _ in \$(seq 30); do pgrep -f $match > /dev/null || break; sleep 1; done; fi; \
rm -f /tmp/libtpu_lockfile 2> /dev/null || sudo -n rm -f /tmp/libtpu_lockfile \
|| echo \"\$(hostname): warning: could not remove /tmp/libtpu_lockfile\" >&2; "
    for i in "${!nodes[@]}"; do
      env=""
      if [ "$num_slices" -gt 1 ]; then
        env="MEGASCALE_COORDINATOR_ADDRESS=$coordinator_ip:$megascale_port \
MEGASCALE_NUM_SLICES=$num_slices MEGASCALE_SLICE_ID=$i MEGASCALE_PORT=$megascale_port "
      fi
      ssh_to "${nodes[$i]}" all "${clear_leftovers}cd $remote_dir && mkdir -p logs && \
py=.venv/bin/python && { ${env}BEIT3_JAX_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=3 \
nohup \"\$py\" -m $command > $log 2>&1 < /dev/null & } && \
echo \"\$(hostname): started; log: $remote_dir/$log\""
    done
    ;;

  logs)
    worker=0
    slice=0
    for arg in "$@"; do
      case "$arg" in
        --worker=*) worker="${arg#--worker=}" ;;
        --slice=*) slice="${arg#--slice=}" ;;
        *) echo "tpu_pod.sh: logs takes only --worker=N and --slice=S" >&2; usage ;;
      esac
    done
    [[ "$worker" =~ ^[0-9]+$ ]] || { echo "tpu_pod.sh: --worker=N needs a number" >&2; usage; }
    if [[ ! "$slice" =~ ^[0-9]+$ ]] || [ "$slice" -ge "$num_slices" ]; then
      echo "tpu_pod.sh: --slice=S needs a number below NUM_SLICES=$num_slices" >&2
      usage
    fi
    if [ -n "${RUN_NAME:-}" ]; then
      pick="log=$remote_dir/logs/$RUN_NAME.log"
    else
      pick="log=\$(ls -t $remote_dir/logs/*.log 2>/dev/null | head -n 1)"
    fi
    ssh_to "${nodes[$slice]}" "$worker" "$pick; [ -f \"\$log\" ] || { echo \"no log in \
$remote_dir/logs\" >&2; exit 1; }; echo \"== \$log\"; tail -n 200 -f \"\$log\""
    ;;

  stop)
    # Every host first gets its SIGTERM (the trainer saves a checkpoint, which takes all hosts),
    # then each node is waited for, all against one deadline.
    for node in "${nodes[@]}"; do
      ssh_to "$node" all "if pkill -TERM -f $match; then \
echo \"\$(hostname): sent SIGTERM; waiting for the checkpoint and the exit\"; \
else echo \"\$(hostname): nothing running\"; fi"
    done
    if [ "${FORCE:-0}" = 1 ]; then
      on_timeout="echo \"\$(hostname): still running after ${stop_timeout}s; FORCE=1: SIGKILL\" \
>&2; pkill -KILL -f $match; exit 0"
    else
      on_timeout="pgrep -af $match | while read -r found; do \
echo \"\$(hostname): still running after ${stop_timeout}s: \$found\" >&2; done; exit 1"
    fi
    deadline=$(( $(date +%s) + stop_timeout ))
    running=()
    for node in "${nodes[@]}"; do
      left=$(( deadline - $(date +%s) ))
      [ "$left" -lt 0 ] && left=0
      if ! ssh_to "$node" all "waited=0; while pgrep -f $match > /dev/null; do \
if [ \$waited -ge $left ]; then $on_timeout; fi; sleep 5; waited=\$((waited + 5)); done; \
echo \"\$(hostname): stopped\""; then
        running+=("$node")
      fi
    done
    if [ ${#running[@]} -gt 0 ]; then
      echo "tpu_pod.sh: python -m beit3_jax still runs after STOP_TIMEOUT=$stop_timeout s" \
        "on the hosts named above, of ${running[*]} (or a host could not be reached)." \
        "Run stop again to wait longer; FORCE=1 SIGKILLs it (no checkpoint is saved)." >&2
      exit 1
    fi
    ;;

  delete)
    if [ "$queued" = 1 ]; then
      x gcloud compute tpus queued-resources delete "$qr_id" "${where[@]}" --force --quiet
    else
      x gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
    fi
    ;;
esac
