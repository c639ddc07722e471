"""launch/tpu_pod.sh (printed with --dry-run, and run against a fake gcloud), launch/setup_venv.sh
(against fake python3, apt-get, sudo and id) and launch/sweep.py (on a tiny config)."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, 'launch', 'tpu_pod.sh')
SETUP_VENV = os.path.join(REPO, 'launch', 'setup_venv.sh')
SWEEP = os.path.join(REPO, 'launch', 'sweep.py')
POD_VARS = ('TPU_NAME', 'ZONE', 'PROJECT', 'ACCELERATOR_TYPE', 'TPU_VERSION', 'SPOT', 'RUN_NAME',
            'NUM_SLICES', 'QUEUED', 'RESERVED', 'QR_ID', 'STOP_TIMEOUT', 'FORCE')
BASH = shutil.which('bash')


def write_script(path, text):
  path.write_text(text)
  path.chmod(0o755)
  return path


def pod(*args, tmp_path, **env):
  """Runs tpu_pod.sh; returns (returncode, [argv of each `+ ` line], stderr)."""
  full_env = {k: v for k, v in os.environ.items() if k not in POD_VARS}
  full_env.update(TMPDIR=str(tmp_path), **env)
  result = subprocess.run(['bash', TPU_POD, *args], env=full_env, capture_output=True,
                          text=True, timeout=30)
  lines = result.stdout.splitlines()
  assert all(line.startswith('+ ') for line in lines), result.stdout
  return result.returncode, [shlex.split(line[2:]) for line in lines], result.stderr


def pod_ok(*args, tmp_path, **env):
  env = dict(TPU_NAME='my-tpu', ZONE='us-central2-b') | env
  returncode, commands, stderr = pod('--dry-run', *args, tmp_path=tmp_path, **env)
  assert returncode == 0, stderr
  return commands


def option(command, name):
  return command[command.index(name) + 1]


# A stand-in for a TPU host's pgrep and pkill, for running a remote command here: `procs` holds
# the matching processes ("PID COMMAND LINE" lines); after `polls` pgrep calls they are gone.
FAKE_PGREP = '''#!BASH
state="$FAKE_HOST"
if [ -f "$state/polls" ]; then
  n=$(< "$state/polls")
  if [ "$n" -le 0 ]; then : > "$state/procs"; else echo $((n - 1)) > "$state/polls"; fi
fi
[ -s "$state/procs" ] || exit 1
while read -r pid rest; do
  if [ "$1" = -af ]; then echo "$pid $rest"; else echo "$pid"; fi
done < "$state/procs"
'''
FAKE_PKILL = '''#!BASH
echo "$*" >> "$FAKE_HOST/pkill.log"
[ -s "$FAKE_HOST/procs" ] || exit 1
[ "$1" = -KILL ] && : > "$FAKE_HOST/procs"
exit 0
'''


@pytest.fixture
def fake_host(tmp_path):
  """Runs a remote command in this shell, with ~ = tmp_path/home and fake pgrep and pkill (the
  real ones would reach this machine's processes). Returns run(remote, procs=..., polls=...)."""
  host = tmp_path / 'host'
  (host / 'bin').mkdir(parents=True)
  for name, text in (('pgrep', FAKE_PGREP), ('pkill', FAKE_PKILL)):
    write_script(host / 'bin' / name, text.replace('BASH', BASH))
  home = tmp_path / 'home'
  home.mkdir()

  def run(remote, procs=(), polls=None):
    (host / 'procs').write_text(''.join(f'{line}\n' for line in procs))
    if polls is not None:
      (host / 'polls').write_text(f'{polls}\n')
    (host / 'pkill.log').write_text('')
    # No waiting, and this machine's libtpu lock file stays where it is.
    remote = remote.replace('sleep 5', 'sleep 0').replace('sleep 1', 'sleep 0')
    remote = remote.replace('/tmp/libtpu_lockfile', str(host / 'libtpu_lockfile'))
    env = dict(os.environ, HOME=str(home), FAKE_HOST=str(host),
               PATH=f'{host / "bin"}:{os.environ["PATH"]}')
    result = subprocess.run([BASH, '-c', remote], env=env, capture_output=True, text=True,
                            timeout=20)
    return result, (host / 'pkill.log').read_text().splitlines()

  run.home = home
  run.host = host
  return run


def test_pod_create(tmp_path):
  [command] = pod_ok('create', tmp_path=tmp_path)
  assert command[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu']
  assert option(command, '--zone') == 'us-central2-b'
  assert option(command, '--accelerator-type') == 'v4-8'
  assert option(command, '--version') == 'tpu-ubuntu2204-base'
  assert '--project' not in command and '--spot' not in command
  [command] = pod_ok('create', tmp_path=tmp_path, PROJECT='proj', ACCELERATOR_TYPE='v4-32',
                     TPU_VERSION='tpu-ubuntu2204-custom')
  assert option(command, '--project') == 'proj'
  assert option(command, '--accelerator-type') == 'v4-32'
  assert option(command, '--version') == 'tpu-ubuntu2204-custom'


def test_pod_setup_prints_the_archive_and_makes_none(tmp_path):
  archive, scp, ssh = pod_ok('setup', tmp_path=tmp_path)
  assert archive[:3] == ['git', '-C', REPO] and archive[-1] == 'HEAD'
  path = option(archive, '-o')
  assert not os.path.exists(path)
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and scp[5] == path
  assert scp[6] == 'my-tpu:beit3_jax.tar.gz' and '--worker=all' in scp
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
  assert '--worker=all' in ssh and option(ssh, '--zone') == 'us-central2-b'
  remote = option(ssh, '--command')
  assert 'tar -xzf ~/beit3_jax.tar.gz -C ~/beit3_jax' in remote
  assert 'bash ~/beit3_jax/launch/setup_venv.sh tpu' in remote


def test_pod_run_command_and_quoting(tmp_path, fake_host):
  args = ['--config=configs/pretrain/base.py', '--workdir=gs://b/run1', '--note=two words',
          "--quote=it's", '--dollar=$HOME']
  [ssh] = pod_ok('run', 'beit3_jax.main', *args, tmp_path=tmp_path, RUN_NAME='run1',
                 PROJECT='proj')
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
  assert '--worker=all' in ssh and option(ssh, '--project') == 'proj'
  remote = option(ssh, '--command')
  assert 'cd ~/beit3_jax && mkdir -p logs && py=.venv/bin/python && ' in remote
  assert 'BEIT3_JAX_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=3 nohup "$py" -m beit3_jax.main' in remote
  assert '> logs/run1.log 2>&1 < /dev/null &' in remote
  assert 'MEGASCALE' not in remote
  # The remote shell's own command line must not match the pattern it kills.
  assert 'python -m beit3_jax' not in remote.replace('[p]ython', '')

  # What each host's shell would do with it: a fake ~/beit3_jax/.venv/bin/python prints its
  # argv and environment to the log, in the background.
  venv_bin = fake_host.home / 'beit3_jax' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  write_script(venv_bin / 'python', textwrap.dedent("""\
      #!/bin/sh
      for arg in "$@"; do echo "arg:$arg"; done
      echo "dist:$BEIT3_JAX_DISTRIBUTED"
      echo done
      """))
  result, pkills = fake_host(remote)
  assert result.returncode == 0, result.stderr
  assert 'started; log: ~/beit3_jax/logs/run1.log' in result.stdout
  assert pkills == [] and 'warning' not in result.stderr
  log = fake_host.home / 'beit3_jax' / 'logs' / 'run1.log'
  for _ in range(100):
    if log.exists() and log.read_text().endswith('done\n'):
      break
    time.sleep(0.05)
  lines = log.read_text().splitlines()
  assert lines == ['arg:-m', 'arg:beit3_jax.main'] + [f'arg:{a}' for a in args] + [
      'dist:1', 'done']


@pytest.mark.faults
def test_pod_run_clears_a_leftover_process_and_the_libtpu_lock(tmp_path, fake_host):
  [ssh] = pod_ok('run', 'beit3_jax.main', tmp_path=tmp_path, RUN_NAME='r')
  remote = option(ssh, '--command')
  venv_bin = fake_host.home / 'beit3_jax' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  write_script(venv_bin / 'python', '#!/bin/sh\necho ran\n')
  (fake_host.host / 'libtpu_lockfile').write_text('')
  result, pkills = fake_host(remote, procs=['4242 .venv/bin/python -m beit3_jax.main --old'])
  assert result.returncode == 0, result.stderr
  assert pkills == ["-KILL -f [p]ython -m beit3_jax"]
  [warning] = [line for line in result.stderr.splitlines() if 'warning' in line]
  assert 'killing a leftover process' in warning
  assert warning.endswith('4242 .venv/bin/python -m beit3_jax.main --old')
  assert not (fake_host.host / 'libtpu_lockfile').exists()
  assert 'started; log: ~/beit3_jax/logs/r.log' in result.stdout
  # The clean-up comes before the start.
  assert remote.index('pkill -KILL') < remote.index('rm -f') < remote.index('nohup')


def test_pod_run_without_run_name_uses_a_timestamp(tmp_path):
  [ssh] = pod_ok('run', 'beit3_jax.main', tmp_path=tmp_path)
  remote = option(ssh, '--command')
  assert 'nohup "$py" -m beit3_jax.main > logs/2' in remote  # logs/YYYYmmdd-HHMMSS.log
  assert "''" not in remote  # no empty argument after the module


def test_pod_logs(tmp_path):
  [ssh] = pod_ok('logs', tmp_path=tmp_path)
  assert '--worker=0' in ssh and ssh[5] == 'my-tpu'
  [ssh] = pod_ok('logs', '--worker=3', tmp_path=tmp_path)
  assert '--worker=3' in ssh
  remote = option(ssh, '--command')
  assert 'tail -n 200 -f "$log"' in remote
  [ssh] = pod_ok('logs', '--worker=1', '--slice=2', tmp_path=tmp_path, NUM_SLICES='3')
  assert ssh[5] == 'my-tpu-2' and '--worker=1' in ssh

  # Picks the newest log (run here without -f, so that it ends).
  logs = tmp_path / 'home' / 'beit3_jax' / 'logs'
  logs.mkdir(parents=True)
  (logs / 'old.log').write_text('old run\n')
  (logs / 'new.log').write_text('new run\n')
  os.utime(logs / 'old.log', (time.time() - 100,) * 2)
  result = subprocess.run(['bash', '-c', remote.replace('tail -n 200 -f', 'tail -n 200')],
                          env=dict(os.environ, HOME=str(tmp_path / 'home')),
                          capture_output=True, text=True, timeout=10)
  assert result.returncode == 0 and result.stdout.endswith('new.log\nnew run\n'), result


def test_pod_stop_and_delete(tmp_path):
  term, wait = pod_ok('stop', tmp_path=tmp_path)
  assert '--worker=all' in term and '--worker=all' in wait
  assert "pkill -TERM -f '[p]ython -m beit3_jax'" in option(term, '--command')
  assert "while pgrep -f '[p]ython -m beit3_jax'" in option(wait, '--command')
  assert '-ge 900' in option(wait, '--command')  # STOP_TIMEOUT's default
  [delete] = pod_ok('delete', tmp_path=tmp_path)
  assert delete[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'my-tpu']
  assert '--quiet' in delete and option(delete, '--zone') == 'us-central2-b'


@pytest.mark.faults
def test_pod_stop_waits_for_the_exit(tmp_path, fake_host):
  _, wait = pod_ok('stop', tmp_path=tmp_path, STOP_TIMEOUT='60')
  remote = option(wait, '--command')
  # The trainer exits (after its checkpoint) on the third poll.
  result, pkills = fake_host(remote, procs=['7 python -m beit3_jax.main'], polls=2)
  assert result.returncode == 0 and result.stdout.endswith(': stopped\n'), result
  assert pkills == []


@pytest.mark.faults
@pytest.mark.parametrize('force', ['0', '1'])
def test_pod_stop_timeout_names_the_host_and_kills_only_with_force(tmp_path, fake_host, force):
  _, wait = pod_ok('stop', tmp_path=tmp_path, STOP_TIMEOUT='10', FORCE=force)
  remote = option(wait, '--command')
  result, pkills = fake_host(remote, procs=['7 python -m beit3_jax.main --x'])
  hostname = subprocess.run(['hostname'], capture_output=True, text=True).stdout.strip()
  if force == '1':
    assert result.returncode == 0
    assert pkills == ['-KILL -f [p]ython -m beit3_jax']
    assert f'{hostname}: still running after 10s; FORCE=1: SIGKILL' in result.stderr
  else:
    assert result.returncode == 1 and pkills == []
    assert f'{hostname}: still running after 10s: 7 python -m beit3_jax.main --x' in result.stderr


@pytest.mark.parametrize('args, env, message', [
    (['--dry-run', 'run', 'beit3_jax.main'], dict(ZONE='z'), 'set TPU_NAME'),
    (['--dry-run', 'create'], dict(TPU_NAME='t'), 'set ZONE'),
    (['--dry-run', 'launch'], dict(TPU_NAME='t', ZONE='z'), "unknown subcommand 'launch'"),
    ([], dict(TPU_NAME='t', ZONE='z'), 'no subcommand'),
    (['--dry-run', 'run'], dict(TPU_NAME='t', ZONE='z'), 'run needs a MODULE'),
    (['--dry-run', 'logs', '--worker=x'], dict(TPU_NAME='t', ZONE='z'), '--worker=N'),
    (['--dry-run', 'logs', '--slice=1'], dict(TPU_NAME='t', ZONE='z'), 'below NUM_SLICES=1'),
    (['--dry-run', 'delete', 'now'], dict(TPU_NAME='t', ZONE='z'), 'takes no arguments'),
    (['--dry-run', 'create'], dict(TPU_NAME='t', ZONE='z', SPOT='1', RESERVED='1'),
     'SPOT=1 and RESERVED=1 exclude each other'),
    (['--dry-run', 'create'], dict(TPU_NAME='t', ZONE='z', NUM_SLICES='0'), 'NUM_SLICES=0'),
    (['--dry-run', 'stop'], dict(TPU_NAME='t', ZONE='z', STOP_TIMEOUT='5m'), 'STOP_TIMEOUT=5m'),
    (['--dry-run', 'create'], dict(TPU_NAME='t', ZONE='z', ACCELERATOR_TYPE='v3-8'),
     'no runtime image known for ACCELERATOR_TYPE=v3-8 (known: v4-*, v5litepod-*, v5p-*, '
     'v6e-*); set TPU_VERSION'),
])
def test_pod_usage_errors(tmp_path, args, env, message):
  returncode, commands, stderr = pod(*args, tmp_path=tmp_path, **env)
  assert returncode == 2 and commands == []
  assert message in stderr and 'usage: bash launch/tpu_pod.sh' in stderr


# tpu_pod.sh run for real against this stand-in for gcloud: it appends its argv to
# $GCLOUD_LOG as one JSON line (with the size of any file named in it, for scp), prints an
# internal IP for `describe --format=value(networkEndpoints[0].ipAddress)`, and fails the
# `stop` wait on the node named in $FAKE_GCLOUD_STILL_RUNNING.
FAKE_GCLOUD = '''#!PYTHON
import json, os, sys
argv = sys.argv[1:]
files = {a: os.path.getsize(a) for a in argv if os.path.isfile(a)}
with open(os.environ['GCLOUD_LOG'], 'a') as log:
  log.write(json.dumps({'argv': argv, 'files': files}) + '\\n')
if 'describe' in argv and '--format=value(networkEndpoints[0].ipAddress)' in argv:
  print(os.environ.get('FAKE_GCLOUD_IP', '10.0.0.2'))
if ('ssh' in argv and argv[argv.index('ssh') + 1] == os.environ.get('FAKE_GCLOUD_STILL_RUNNING')
    and argv[argv.index('--command') + 1].startswith('waited=')):
  sys.exit(1)
'''
ACCELERATORS = [('v4-32', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
                ('v5p-8', 'v2-alpha-tpuv5'), ('v6e-8', 'v2-alpha-tpuv6e')]
WHERE = ['--zone', 'us-east5-a', '--project', 'proj']


@pytest.fixture
def gcloud_pod(tmp_path):
  """Runs tpu_pod.sh (no --dry-run) with the fake gcloud first on PATH; returns
  (returncode, [each gcloud call's argv], stderr, [each call's files])."""
  bin_dir = tmp_path / 'gcloud_bin'
  bin_dir.mkdir()
  write_script(bin_dir / 'gcloud', FAKE_GCLOUD.replace('PYTHON', sys.executable))
  log = tmp_path / 'gcloud.jsonl'

  def run(*args, **env):
    log.write_text('')
    full_env = {k: v for k, v in os.environ.items() if k not in POD_VARS}
    full_env.update(TPU_NAME='pod', ZONE='us-east5-a', PROJECT='proj', TMPDIR=str(tmp_path),
                    GCLOUD_LOG=str(log), PATH=f'{bin_dir}:{os.environ["PATH"]}', **env)
    result = subprocess.run(['bash', TPU_POD, *args], env=full_env, capture_output=True,
                            text=True, timeout=30)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return (result.returncode, [c['argv'] for c in calls], result.stderr,
            [c['files'] for c in calls])

  return run


def remote_of(call):
  return call[call.index('--command') + 1]


@pytest.mark.faults
@pytest.mark.parametrize('accelerator, image', ACCELERATORS)
def test_pod_create_picks_the_image_and_queues(gcloud_pod, accelerator, image):
  env = dict(ACCELERATOR_TYPE=accelerator)
  returncode, [call], stderr, _ = gcloud_pod('create', **env)
  assert returncode == 0, stderr
  assert call == ['compute', 'tpus', 'tpu-vm', 'create', 'pod', *WHERE,
                  '--accelerator-type', accelerator, '--version', image]
  queued = ['compute', 'tpus', 'queued-resources', 'create', 'pod-qr', '--node-id', 'pod',
            '--accelerator-type', accelerator, '--runtime-version', image, *WHERE]
  for extra_env, flags in ((dict(QUEUED='1'), []), (dict(SPOT='1'), ['--spot']),
                           (dict(RESERVED='1'), ['--reserved']),
                           (dict(QUEUED='1', SPOT='1'), ['--spot'])):
    returncode, [call], stderr, _ = gcloud_pod('create', **env, **extra_env)
    assert returncode == 0, stderr
    assert call == queued + flags
    assert 'queued resource pod-qr requested' in stderr
  returncode, [call], _, _ = gcloud_pod('create', **env, QUEUED='1', QR_ID='my-qr',
                                        TPU_VERSION='custom-image')
  assert call[4] == 'my-qr' and option(call, '--runtime-version') == 'custom-image'


@pytest.mark.faults
@pytest.mark.parametrize('accelerator, image', ACCELERATORS)
@pytest.mark.parametrize('num_slices', [1, 2])
def test_pod_lifecycle_against_gcloud(gcloud_pod, accelerator, image, num_slices):
  env = dict(ACCELERATOR_TYPE=accelerator, RUN_NAME='r1')
  if num_slices > 1:
    env.update(NUM_SLICES=str(num_slices), SPOT='1')
    nodes = [f'pod-{i}' for i in range(num_slices)]
  else:
    nodes = ['pod']
  ssh = ['compute', 'tpus', 'tpu-vm', 'ssh']

  returncode, [call], stderr, _ = gcloud_pod('create', **env)
  assert returncode == 0, stderr
  if num_slices > 1:
    assert call == ['compute', 'tpus', 'queued-resources', 'create', 'pod-qr',
                    '--node-count', str(num_slices), '--node-prefix', 'pod',
                    '--accelerator-type', accelerator, '--runtime-version', image, *WHERE,
                    '--spot']
  else:
    assert call == ['compute', 'tpus', 'tpu-vm', 'create', 'pod', *WHERE,
                    '--accelerator-type', accelerator, '--version', image]

  returncode, [call], stderr, _ = gcloud_pod('status', **env)
  assert returncode == 0, stderr
  assert call == (['compute', 'tpus', 'queued-resources', 'describe', 'pod-qr', *WHERE]
                  if num_slices > 1 else ['compute', 'tpus', 'tpu-vm', 'describe', 'pod', *WHERE])

  # setup: the real `git archive HEAD`, then scp + ssh to every host of every slice.
  returncode, calls, stderr, files = gcloud_pod('setup', **env)
  assert returncode == 0, stderr
  assert len(calls) == 2 * num_slices
  for i, node in enumerate(nodes):
    scp, install = calls[2 * i], calls[2 * i + 1]
    assert scp[:4] == ['compute', 'tpus', 'tpu-vm', 'scp']
    assert scp[5:] == [f'{node}:beit3_jax.tar.gz', *WHERE, '--worker=all']
    assert files[2 * i][scp[4]] > 1000  # the archive existed, not empty, when it was copied
    assert install[:5] == ssh + [node] and '--worker=all' in install
    assert 'bash ~/beit3_jax/launch/setup_venv.sh tpu' in remote_of(install)
  assert not os.path.exists(calls[0][4])  # removed afterwards

  returncode, calls, stderr, _ = gcloud_pod('run', 'beit3_jax.main', '--workdir=gs://b/r1',
                                            **env)
  assert returncode == 0, stderr
  if num_slices > 1:
    assert calls[0] == ['compute', 'tpus', 'tpu-vm', 'describe', 'pod-0', *WHERE,
                        '--format=value(networkEndpoints[0].ipAddress)']
    calls = calls[1:]
  assert [call[:5] for call in calls] == [ssh + [node] for node in nodes]
  for i, call in enumerate(calls):
    remote = remote_of(call)
    assert '--worker=all' in call
    assert remote.index('pkill -KILL') < remote.index('rm -f /tmp/libtpu_lockfile') < \
        remote.index('nohup "$py" -m beit3_jax.main --workdir=gs://b/r1 > logs/r1.log')
    if num_slices > 1:
      assert (f'MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080 MEGASCALE_NUM_SLICES={num_slices} '
              f'MEGASCALE_SLICE_ID={i} MEGASCALE_PORT=8080 BEIT3_JAX_DISTRIBUTED=1') in remote
    else:
      assert 'MEGASCALE' not in remote

  # stop: SIGTERM to every slice first, then the wait on each.
  returncode, calls, stderr, _ = gcloud_pod('stop', **env)
  assert returncode == 0, stderr
  assert [call[:5] for call in calls] == [ssh + [node] for node in nodes * 2]
  assert all('pkill -TERM' in remote_of(call) for call in calls[:num_slices])
  assert all(remote_of(call).startswith('waited=0; while pgrep') for call in calls[num_slices:])

  returncode, [call], stderr, _ = gcloud_pod('delete', **env)
  assert returncode == 0, stderr
  assert call == (['compute', 'tpus', 'queued-resources', 'delete', 'pod-qr', *WHERE, '--force',
                   '--quiet'] if num_slices > 1 else
                  ['compute', 'tpus', 'tpu-vm', 'delete', 'pod', *WHERE, '--quiet'])


@pytest.mark.faults
def test_pod_queued_single_slice_status_and_delete(gcloud_pod):
  returncode, [call], stderr, _ = gcloud_pod('status', QUEUED='1', QR_ID='q')
  assert returncode == 0, stderr
  assert call == ['compute', 'tpus', 'queued-resources', 'describe', 'q', *WHERE]
  returncode, [call], stderr, _ = gcloud_pod('delete', RESERVED='1')
  assert call == ['compute', 'tpus', 'queued-resources', 'delete', 'pod-qr', *WHERE, '--force',
                  '--quiet']


@pytest.mark.faults
def test_pod_stop_reports_the_slice_still_running(gcloud_pod):
  returncode, calls, stderr, _ = gcloud_pod('stop', NUM_SLICES='3', STOP_TIMEOUT='30',
                                            FAKE_GCLOUD_STILL_RUNNING='pod-1')
  assert returncode == 1
  assert len(calls) == 6  # every slice was still waited for
  assert 'still runs after STOP_TIMEOUT=30 s on the hosts named above, of pod-1' in stderr
  assert 'FORCE=1 SIGKILLs it' in stderr


@pytest.mark.faults
def test_pod_multislice_run_needs_the_coordinator_ip(gcloud_pod):
  returncode, calls, stderr, _ = gcloud_pod('run', 'beit3_jax.main', NUM_SLICES='2',
                                            FAKE_GCLOUD_IP='')
  assert returncode == 1 and len(calls) == 1  # the describe, and no ssh
  assert 'no internal IP for host 0 of pod-0' in stderr and 'tpu_pod.sh status' in stderr


def test_pod_multislice_dry_run_uses_a_placeholder(tmp_path):
  describe, first, second = pod_ok('run', 'beit3_jax.main', tmp_path=tmp_path, NUM_SLICES='2')
  assert describe[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'my-tpu-0']
  assert 'MEGASCALE_COORDINATOR_ADDRESS=COORDINATOR_IP:8080' in option(first, '--command')
  assert 'MEGASCALE_SLICE_ID=1' in option(second, '--command')


# setup_venv.sh where the system Python is 3.10 (a TPU VM image): only these fakes and a few
# real tools are on PATH, since this machine's own python3 is new enough.
FAKE_PYTHON310 = '''#!BASH
echo "python3 $*" >> "$FAKE_LOG"
case "$1" in
  -c) echo 3.10.12; exit 1 ;;
  --version) echo "Python 3.10.12" ;;
esac
'''
FAKE_PYTHON311 = '''#!BASH
echo "python3.11 $*" >> "$FAKE_LOG"
case "$1" in
  -c) echo 3.11.9 ;;
  --version) echo "Python 3.11.9" ;;
  -m) [ "$2" = venv ] && mkdir -p "$3/bin" && cp "$STAGED/venv_python" "$3/bin/python" ;;
esac
exit 0
'''
FAKE_VENV_PYTHON = '''#!BASH
echo "venv-python $*" >> "$FAKE_LOG"
exit 0
'''
FAKE_APT_GET = '''#!BASH
echo "apt-get $* (DEBIAN_FRONTEND=$DEBIAN_FRONTEND)" >> "$FAKE_LOG"
[ -n "$FAKE_APT_FAILS" ] && exit 100
[ "$1" = install ] && cp "$STAGED/python3.11" "$FAKE_BIN/python3.11"
exit 0
'''
FAKE_SUDO = '''#!BASH
echo "sudo $*" >> "$FAKE_LOG"
[ "$1" = -n ] && shift
exec "$@"
'''
FAKE_ID = '''#!BASH
[ "$1" = -u ] && echo "$FAKE_UID"
'''


@pytest.fixture
def old_python_host(tmp_path):
  """Runs setup_venv.sh with a PATH of fakes; returns run(*args, uid=, sudo=, apt=, apt_fails=) ->
  (CompletedProcess, [recorded calls])."""
  fake_bin, tools, staged = tmp_path / 'fake_bin', tmp_path / 'tools', tmp_path / 'staged'
  for d in (fake_bin, tools, staged):
    d.mkdir()
  for name in ('bash', 'dirname', 'env', 'cat', 'mkdir', 'cp'):
    (tools / name).symlink_to(shutil.which(name))
  write_script(staged / 'python3.11', FAKE_PYTHON311.replace('BASH', BASH))
  write_script(staged / 'venv_python', FAKE_VENV_PYTHON.replace('BASH', BASH))
  write_script(fake_bin / 'python3', FAKE_PYTHON310.replace('BASH', BASH))
  write_script(fake_bin / 'id', FAKE_ID.replace('BASH', BASH))
  log = tmp_path / 'calls.log'

  def run(*args, uid=1000, sudo=True, apt=True, apt_fails=False):
    log.write_text('')
    for name, text, wanted in (('sudo', FAKE_SUDO, sudo), ('apt-get', FAKE_APT_GET, apt)):
      if wanted:
        write_script(fake_bin / name, text.replace('BASH', BASH))
      else:
        (fake_bin / name).unlink(missing_ok=True)
    env = dict(PATH=f'{fake_bin}:{tools}', HOME=str(tmp_path), VENV=str(tmp_path / 'venv'),
               FAKE_LOG=str(log), FAKE_BIN=str(fake_bin), STAGED=str(staged),
               FAKE_UID=str(uid), FAKE_APT_FAILS='1' if apt_fails else '')
    result = subprocess.run([BASH, SETUP_VENV, *args], env=env, capture_output=True, text=True,
                            timeout=30)
    calls = log.read_text().splitlines()
    return result, calls

  run.venv = tmp_path / 'venv'
  return run


@pytest.mark.faults
def test_setup_venv_installs_python311_through_sudo(old_python_host):
  result, calls = old_python_host('tpu')
  assert result.returncode == 0, result.stderr
  assert 'installing python3.11 and python3.11-venv with sudo -n apt-get' in result.stdout
  assert 'python3 (' in result.stdout and 'is Python 3.10.12' in result.stdout
  venv = old_python_host.venv
  assert [c for c in calls if c.startswith(('sudo', 'apt-get'))] == [
      'sudo -n env DEBIAN_FRONTEND=noninteractive apt-get update',
      'apt-get update (DEBIAN_FRONTEND=noninteractive)',
      'sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y python3.11 python3.11-venv',
      'apt-get install -y python3.11 python3.11-venv (DEBIAN_FRONTEND=noninteractive)']
  assert f'python3.11 -m venv {venv}' in calls
  constraints = os.path.join(REPO, 'constraints.txt')
  assert (f'venv-python -m pip install --quiet --disable-pip-version-check -c {constraints} '
          f'-e {REPO}[tpu]') in calls
  # The install happens only once the version probe has found no Python >= 3.11.
  assert calls.index('python3.11 -m venv ' + str(venv)) > calls.index(
      'apt-get install -y python3.11 python3.11-venv (DEBIAN_FRONTEND=noninteractive)')
  assert result.stdout.rstrip().endswith(f'Ready: {venv}/bin/python')


@pytest.mark.faults
def test_setup_venv_as_root_runs_apt_get_itself(old_python_host):
  result, calls = old_python_host(uid=0, sudo=False)
  assert result.returncode == 0, result.stderr
  assert not any(c.startswith('sudo') for c in calls)
  assert 'apt-get install -y python3.11 python3.11-venv (DEBIAN_FRONTEND=noninteractive)' in calls
  assert f'python3.11 -m venv {old_python_host.venv}' in calls


@pytest.mark.faults
def test_setup_venv_without_sudo_or_apt_get_asks_for_python(old_python_host):
  result, calls = old_python_host(sudo=False)
  assert result.returncode == 1
  assert 'no Python >= 3.11 among python3' in result.stderr
  assert 'sudo is missing' in result.stderr and 'set PYTHON' in result.stderr
  assert not any(c.startswith('apt-get') for c in calls)

  result, calls = old_python_host(apt=False)
  assert result.returncode == 1
  assert 'no Python >= 3.11 among python3, python3.13, python3.12, python3.11' in result.stderr
  assert 'is Python 3.10.12' in result.stderr and 'Set PYTHON to one.' in result.stderr
  assert not any(c.startswith(('apt-get', 'python3.11')) for c in calls)
  assert not old_python_host.venv.exists()

  result, calls = old_python_host(apt_fails=True)  # e.g. sudo wants a password
  assert result.returncode == 1
  assert 'apt-get update failed' in result.stderr
  assert 'apt-get could not install python3.11 and python3.11-venv' in result.stderr
  assert 'set PYTHON' in result.stderr and not old_python_host.venv.exists()


CONFIG = '''
import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.variant = arg or 'default'
  config.lr = 1e-3
  config.seed = 0
  config.exit_code = 0
  config.mesh_shape = (-1, 1, 1)
  config.model = ml_collections.ConfigDict()
  config.model.drop_path_rate = 0.0
  config.model.use_bias = True
  return config


def get_sweep(arg=None):
  if arg == 'bad':
    return [{'lr': 1e-3}, {'model.drop_rate': 0.1}]
  if arg == 'fail':
    return [{'exit_code': 0}, {'exit_code': 3}, {'exit_code': 0}]
  return [{'lr': 1e-3, 'seed': 0},
          {'lr': 3e-4, 'seed': 1, 'model.drop_path_rate': 0.1, 'model.use_bias': False,
           'mesh_shape': (4, 2, 1), 'variant': 'a b'}]
'''

# Stands in for beit3_jax.main: parses the same flags and records what it got.
RECORDER = '''
import json, os, sys
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'workdir')


def main(argv):
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(os.path.join(_WORKDIR.value, 'record.json'), 'w') as f:
    json.dump({'argv': sys.argv[1:], 'config': _CONFIG.value.to_dict()}, f)
  return _CONFIG.value.exit_code


app.run(main)
'''


@pytest.fixture
def sweep_files(tmp_path):
  (tmp_path / 'cfg.py').write_text(CONFIG)
  (tmp_path / 'record_argv.py').write_text(RECORDER)
  return tmp_path


def sweep(tmp_path, *args):
  env = dict(os.environ, PYTHONPATH=str(tmp_path))
  return subprocess.run([sys.executable, SWEEP, *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=60)


def test_sweep_dry_run_prints_and_writes_nothing(sweep_files):
  result = sweep(sweep_files, '--config=cfg.py', '--workdir_root=sw', '--dry-run', '--',
                 '--config.exit_code=0')
  assert result.returncode == 0, result.stderr
  first, second = [shlex.split(line) for line in result.stdout.splitlines()]
  assert first == ['python', '-m', 'beit3_jax.main', '--config=cfg.py',
                   '--workdir=sw/00_lr=0.001,seed=0', '--config.lr=0.001', '--config.seed=0',
                   '--config.exit_code=0']
  assert second[3:] == [
      '--config=cfg.py',
      '--workdir=sw/01_lr=0.0003,seed=1,model.drop_path_rate=0.1,model.use_bias=False,'
      'mesh_shape=_4,2,1_,variant=a_b',
      '--config.lr=0.0003', '--config.seed=1', '--config.model.drop_path_rate=0.1',
      '--config.model.use_bias=False', '--config.mesh_shape=(4,2,1)', '--config.variant=a b',
      '--config.exit_code=0']
  assert not (sweep_files / 'sw').exists()


def test_sweep_writes_sweep_json_and_refuses_a_different_one(sweep_files):
  result = sweep(sweep_files, '--config=cfg.py:x', '--workdir_root=sw')
  assert result.returncode == 0, result.stderr
  written = json.loads((sweep_files / 'sw' / 'sweep.json').read_text())
  assert written['config'] == 'cfg.py:x'
  assert [run['name'] for run in written['runs']] == [
      '00_lr=0.001,seed=0',
      '01_lr=0.0003,seed=1,model.drop_path_rate=0.1,model.use_bias=False,mesh_shape=_4,2,1_,'
      'variant=a_b']
  assert written['runs'][0]['overrides'] == {'lr': 0.001, 'seed': 0}
  assert written['runs'][0]['workdir'] == 'sw/00_lr=0.001,seed=0'
  assert written['runs'][0]['command'][3] == '--config=cfg.py:x'
  printed = [shlex.split(line) for line in result.stdout.splitlines()[1:]]
  assert printed == [run['command'] for run in written['runs']]

  # The same sweep again is fine (a rerun resumes); a different one is refused.
  assert sweep(sweep_files, '--config=cfg.py:x', '--workdir_root=sw').returncode == 0
  result = sweep(sweep_files, '--config=cfg.py:y', '--workdir_root=sw')
  assert result.returncode == 2
  assert 'different sweep' in result.stderr and 'new --workdir_root' in result.stderr


def test_sweep_bad_key_and_missing_get_sweep(sweep_files):
  result = sweep(sweep_files, '--config=cfg.py:bad', '--workdir_root=sw', '--dry-run')
  assert result.returncode == 2
  assert "cfg.py: run 1 of get_sweep() sets 'model.drop_rate'" in result.stderr
  assert "no field 'drop_rate'" in result.stderr
  (sweep_files / 'plain.py').write_text(CONFIG.split('def get_sweep')[0])
  result = sweep(sweep_files, '--config=plain.py', '--workdir_root=sw', '--dry-run')
  assert result.returncode == 2 and 'plain.py has no get_sweep' in result.stderr


def test_sweep_run_passes_flags_that_ml_collections_parses(sweep_files):
  result = sweep(sweep_files, '--config=cfg.py', '--workdir_root=sw', '--run',
                 '--module=record_argv')
  assert result.returncode == 0, result.stderr
  assert 'All 2 runs finished.' in result.stdout
  written = json.loads((sweep_files / 'sw' / 'sweep.json').read_text())
  records = [json.loads((sweep_files / run['workdir'] / 'record.json').read_text())
             for run in written['runs']]
  assert records[0]['argv'] == written['runs'][0]['command'][3:]
  assert records[0]['config']['lr'] == 1e-3 and records[0]['config']['variant'] == 'default'
  config = records[1]['config']
  assert (config['lr'], config['seed'], config['variant']) == (3e-4, 1, 'a b')
  assert config['model'] == {'drop_path_rate': 0.1, 'use_bias': False}
  assert config['mesh_shape'] == [4, 2, 1]


def test_sweep_run_stops_at_the_first_failure(sweep_files):
  result = sweep(sweep_files, '--config=cfg.py:fail', '--workdir_root=sw', '--run',
                 '--module=record_argv')
  assert result.returncode == 3
  assert 'run 01_exit_code=3 failed with exit code 3' in result.stderr
  assert (sweep_files / 'sw' / '00_exit_code=0' / 'record.json').exists()
  assert (sweep_files / 'sw' / '01_exit_code=3' / 'record.json').exists()
  assert not (sweep_files / 'sw' / '02_exit_code=0').exists()
