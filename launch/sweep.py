"""Expands a config's sweep into one `beit3_jax.main` run per setting, and runs them if asked.

    python launch/sweep.py --config=configs/pretrain/demo.py --workdir_root=workdirs/sweep1
    python launch/sweep.py --config=configs/pretrain/demo.py --workdir_root=workdirs/sweep1 --run
    python launch/sweep.py --config=PATH.py:ARG --workdir_root=DIR --dry-run -- --config.seed=1

The config file declares its sweep beside `get_config(arg=None)`:

    def get_sweep(arg=None):
      return [{'lr': 1e-3, 'seed': 0}, {'lr': 3e-4, 'seed': 0}]   # dotted config fields

Each dict becomes a run in `<workdir_root>/<NN>_<field=value,...>` with the command
`python -m beit3_jax.main --config=PATH[:ARG] --workdir=... --config.<field>=<value> ...`
(anything after `--` is appended to every command). The runs are written to
`<workdir_root>/sweep.json` (an existing, different one is never overwritten) and printed;
`--run` runs them here one after another and stops at the first failure, `--dry-run` only
prints. The same sweep may be run again (each command reruns in its own workdir).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # configs import beit3_jax

from beit3_jax import defaults  # noqa: E402


class SweepError(Exception):
  pass


def load_config_module(path: str):
  if not os.path.isfile(path):
    raise SweepError(f'{path}: no such config file')
  return defaults.config_module(path)


def call_with_arg(fn, arg):
  """Like ml_collections' config flag: `fn(arg)` when the path had `:arg`, else `fn()`."""
  return fn() if arg is None else fn(arg)


def check_field(config, key: str):
  """Raises KeyError(part) unless the dotted `key` names a field of `config`."""
  node = config
  for part in key.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      raise KeyError(part) from None


def render(value) -> str:
  """A value as ml_collections' `--config.<field>=` parser reads it."""
  if isinstance(value, bool):
    return 'True' if value else 'False'
  if isinstance(value, (tuple, list)):
    items = [literal(v) for v in value]
    return '(' + ','.join(items) + (',)' if len(items) == 1 else ')')
  if isinstance(value, str):
    return value
  return repr(value)


def literal(value) -> str:
  """A value inside a tuple, where ml_collections uses ast.literal_eval (strings keep quotes)."""
  return render(value) if isinstance(value, (bool, tuple, list)) else repr(value)


def run_name(index: int, width: int, overrides: dict) -> str:
  settings = ','.join(f'{k}={render(v)}' for k, v in overrides.items())
  safe = re.sub(r'[^A-Za-z0-9._=,+-]+', '_', settings).strip('_')[:120]
  return f'{index:0{width}d}' + (f'_{safe}' if safe else '')


def build_sweep(config_spec: str, workdir_root: str, extra: list[str],
                module: str = 'beit3_jax.main') -> dict:
  path, sep, arg = config_spec.partition(':')
  arg = arg if sep else None
  config_module = load_config_module(path)
  if not hasattr(config_module, 'get_sweep'):
    raise SweepError(f'{path} has no get_sweep(arg=None); define one that returns a list of '
                     "dicts of dotted config fields, e.g. [{'lr': 1e-3}, {'lr': 3e-4}]")
  config = call_with_arg(config_module.get_config, arg)
  sweep = call_with_arg(config_module.get_sweep, arg)
  if isinstance(sweep, dict):
    sweep = [sweep]
  if not sweep or not all(isinstance(s, dict) for s in sweep):
    raise SweepError(f'{path}: get_sweep() must return a non-empty list of dicts, got {sweep!r}')
  runs = []
  width = max(2, len(str(len(sweep) - 1)))
  for index, overrides in enumerate(sweep):
    for key in overrides:
      try:
        check_field(config, key)
      except KeyError as e:
        raise SweepError(f'{path}: run {index} of get_sweep() sets {key!r}, but the config '
                         f'from get_config() has no field {e.args[0]!r} there') from None
    name = run_name(index, width, overrides)
    workdir = f'{workdir_root.rstrip("/")}/{name}'
    command = ['python', '-m', module, f'--config={config_spec}', f'--workdir={workdir}']
    command += [f'--config.{k}={render(v)}' for k, v in overrides.items()] + list(extra)
    runs.append({'name': name, 'workdir': workdir, 'overrides': overrides, 'command': command})
  return {'config': config_spec, 'runs': runs}


def write_sweep(sweep: dict, workdir_root: str) -> str:
  sweep_json = os.path.join(workdir_root, 'sweep.json')
  text = json.dumps(sweep, indent=2, default=repr) + '\n'
  if os.path.exists(sweep_json):
    with open(sweep_json) as f:
      if f.read() != text:
        raise SweepError(f'{sweep_json} already holds a different sweep; pick a new '
                         '--workdir_root (or delete that directory)')
  else:
    os.makedirs(workdir_root, exist_ok=True)
    with open(sweep_json, 'w') as f:
      f.write(text)
  return sweep_json


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description='Expand a config\'s get_sweep() into beit3_jax.main runs.',
      epilog='Arguments after `--` are appended to every command.')
  parser.add_argument('--config', required=True, help='config file, PATH.py or PATH.py:ARG')
  parser.add_argument('--workdir_root', required=True,
                      help='a local directory; each run gets a subdirectory')
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--run', action='store_true', help='run the commands here, one by one')
  mode.add_argument('--dry-run', action='store_true', help='only print; write nothing')
  parser.add_argument('--module', default='beit3_jax.main', help=argparse.SUPPRESS)  # for tests
  parser.add_argument('extra', nargs='*', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if '://' in args.workdir_root:
    parser.error('--workdir_root must be a local directory (it holds sweep.json); run a pod '
                 'job with a gs:// --workdir through launch/tpu_pod.sh instead')

  try:
    sweep = build_sweep(args.config, args.workdir_root, args.extra, args.module)
    if not args.dry_run:
      print(f'Wrote {write_sweep(sweep, args.workdir_root)}')
  except SweepError as e:
    print(f'sweep.py: error: {e}', file=sys.stderr)
    return 2
  runs = sweep['runs']
  for run in runs:
    print(shlex.join(run['command']))
  if not args.run:
    return 0
  for i, run in enumerate(runs):
    print(f'=== run {i + 1}/{len(runs)}: {run["name"]}', flush=True)
    returncode = subprocess.call([sys.executable] + run['command'][1:])
    if returncode != 0:
      print(f'sweep.py: run {run["name"]} failed with exit code {returncode}; stopping',
            file=sys.stderr)
      return returncode
  print(f'All {len(runs)} runs finished.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
