"""launch/tpu_pod.sh (through --dry-run, no gcloud) and launch/sweep.py (on a tiny config)."""

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, 'launch', 'tpu_pod.sh')
SWEEP = os.path.join(REPO, 'launch', 'sweep.py')
POD_VARS = ('TPU_NAME', 'ZONE', 'PROJECT', 'ACCELERATOR_TYPE', 'TPU_VERSION', 'SPOT', 'RUN_NAME')


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


def test_pod_create(tmp_path):
  [command] = pod_ok('create', tmp_path=tmp_path)
  assert command[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu']
  assert option(command, '--zone') == 'us-central2-b'
  assert option(command, '--accelerator-type') == 'v4-8'
  assert option(command, '--version') == 'tpu-ubuntu2204-base'
  assert '--project' not in command and '--spot' not in command
  [command] = pod_ok('create', tmp_path=tmp_path, PROJECT='proj', SPOT='1',
                     ACCELERATOR_TYPE='v4-32', TPU_VERSION='v2-alpha-tpuv5')
  assert option(command, '--project') == 'proj' and '--spot' in command
  assert option(command, '--accelerator-type') == 'v4-32'
  assert option(command, '--version') == 'v2-alpha-tpuv5'


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


def test_pod_run_command_and_quoting(tmp_path):
  args = ['--config=configs/pretrain/base.py', '--workdir=gs://b/run1', '--note=two words',
          "--quote=it's", '--dollar=$HOME']
  [ssh] = pod_ok('run', 'beit3_jax.main', *args, tmp_path=tmp_path, RUN_NAME='run1',
                 PROJECT='proj')
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
  assert '--worker=all' in ssh and option(ssh, '--project') == 'proj'
  remote = option(ssh, '--command')
  assert remote.startswith('cd ~/beit3_jax && ')
  assert 'BEIT3_JAX_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=3 nohup .venv/bin/python' in remote
  assert '> logs/run1.log 2>&1 < /dev/null &' in remote

  # What each host's shell would do with it: a fake ~/beit3_jax/.venv/bin/python prints its
  # argv and environment to the log, in the background.
  home = tmp_path / 'home'
  venv_bin = home / 'beit3_jax' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  (venv_bin / 'python').write_text(textwrap.dedent("""\
      #!/bin/sh
      for arg in "$@"; do echo "arg:$arg"; done
      echo "dist:$BEIT3_JAX_DISTRIBUTED"
      echo done
      """))
  (venv_bin / 'python').chmod(0o755)
  result = subprocess.run(['bash', '-c', remote], env=dict(os.environ, HOME=str(home)),
                          capture_output=True, text=True, timeout=10)
  assert result.returncode == 0, result.stderr
  assert 'started; log: ~/beit3_jax/logs/run1.log' in result.stdout
  log = home / 'beit3_jax' / 'logs' / 'run1.log'
  for _ in range(100):
    if log.exists() and log.read_text().endswith('done\n'):
      break
    time.sleep(0.05)
  lines = log.read_text().splitlines()
  assert lines == ['arg:-m', 'arg:beit3_jax.main'] + [f'arg:{a}' for a in args] + [
      'dist:1', 'done']


def test_pod_run_without_run_name_uses_a_timestamp(tmp_path):
  [ssh] = pod_ok('run', 'beit3_jax.main', tmp_path=tmp_path)
  remote = option(ssh, '--command')
  assert '.venv/bin/python -m beit3_jax.main > logs/2' in remote  # logs/YYYYmmdd-HHMMSS.log
  assert "''" not in remote  # no empty argument after the module


def test_pod_logs(tmp_path):
  [ssh] = pod_ok('logs', tmp_path=tmp_path)
  assert '--worker=0' in ssh
  [ssh] = pod_ok('logs', '--worker=3', tmp_path=tmp_path)
  assert '--worker=3' in ssh
  remote = option(ssh, '--command')
  assert 'tail -n 200 -f "$log"' in remote

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
  [ssh] = pod_ok('stop', tmp_path=tmp_path)
  assert '--worker=all' in ssh
  assert "pkill -f '[p]ython -m beit3_jax'" in option(ssh, '--command')
  [delete] = pod_ok('delete', tmp_path=tmp_path)
  assert delete[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'my-tpu']
  assert '--quiet' in delete and option(delete, '--zone') == 'us-central2-b'


@pytest.mark.parametrize('args, env, message', [
    (['--dry-run', 'run', 'beit3_jax.main'], dict(ZONE='z'), 'set TPU_NAME'),
    (['--dry-run', 'create'], dict(TPU_NAME='t'), 'set ZONE'),
    (['--dry-run', 'launch'], dict(TPU_NAME='t', ZONE='z'), "unknown subcommand 'launch'"),
    ([], dict(TPU_NAME='t', ZONE='z'), 'no subcommand'),
    (['--dry-run', 'run'], dict(TPU_NAME='t', ZONE='z'), 'run needs a MODULE'),
    (['--dry-run', 'logs', '--worker=x'], dict(TPU_NAME='t', ZONE='z'), '--worker=N'),
    (['--dry-run', 'delete', 'now'], dict(TPU_NAME='t', ZONE='z'), 'takes no arguments'),
])
def test_pod_usage_errors(tmp_path, args, env, message):
  returncode, commands, stderr = pod(*args, tmp_path=tmp_path, **env)
  assert returncode == 2 and commands == []
  assert message in stderr and 'usage: bash launch/tpu_pod.sh' in stderr


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
