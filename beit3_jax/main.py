"""The entry point: `python -m beit3_jax.main --config=configs/<job>.py --workdir=DIR`.

Flags: `--config` is an ml_collections config file; any field can be overridden on the command
line (`--config.seed=1`, `--config.model.img_size=384`). The job is chosen by `config.job`.

On a multi-host TPU slice every host runs the same command (launch/tpu_pod.sh sets
BEIT3_JAX_DISTRIBUTED=1); `jax.distributed.initialize()` is called first whenever more than one
process is detected (see `maybe_initialize_distributed`).

Jobs (`config.job`):
- `pretrain` (configs/pretrain/demo.py, base.py, large.py, giant.py): BEiT-3 masked data
  modeling; resumes from the newest checkpoint in the workdir (`beit3_jax.jobs.pretraining`).
- `tokenizer` (configs/pretrain/tokenizer_*.py): train a VQ-KD visual tokenizer
  (`beit3_jax.jobs.tokenizer_training`); exports it to `config.output` ('' = <workdir>/tokenizer).
- `finetune` (configs/finetune/*.py): fine-tune (or, with `mode=eval`, evaluate) a task
  (`beit3_jax.jobs.finetuning`).
- `smoke` (configs/smoke.py): build the backbone and encode a generated image and a sentence
  (`beit3_jax.jobs.smoke`).

Every field a config may set is declared, with its default and doc, in `beit3_jax.defaults`: a
config file that sets another field (a misspelling) is refused by name before anything is
built, as is any other `defaults.ConfigError` (one message, no traceback).
"""

from __future__ import annotations

import os
import re
import sys
from types import ModuleType
from typing import NamedTuple

from beit3_jax import platforms

platforms.cpu_unless_accelerators()   # before JAX starts: no libtpu warnings on a CPU host

from absl import app, flags, logging  # noqa: E402  (after JAX_PLATFORMS)
from ml_collections import config_flags  # noqa: E402

from beit3_jax import defaults  # noqa: E402
from beit3_jax.data import paths  # noqa: E402
from beit3_jax.jobs import finetuning, pretraining, smoke, tokenizer_training  # noqa: E402
from beit3_jax.trainer import loop  # noqa: E402
from beit3_jax.trainer.run_config import save_run_config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the run\'s outputs.')


class JobEntry(NamedTuple):
  module: ModuleType  # its `run(config, workdir) -> dict` runs the job; an optional
                      # `check(config)` raises ConfigError before the workdir is written
  trains: bool        # a training job: needs --workdir, returns train/val metrics and outputs


JOBS = {
    'pretrain': JobEntry(pretraining, trains=True),
    'tokenizer': JobEntry(tokenizer_training, trains=True),
    'finetune': JobEntry(finetuning, trains=True),
    'smoke': JobEntry(smoke, trains=False),
}


def _multi_process_env() -> bool:
  env = os.environ
  if env.get('BEIT3_JAX_DISTRIBUTED') == '1' or env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    return True
  return any(int(env.get(k, '1') or 1) > 1 for k in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when more than one process is detected.

  Detected: BEIT3_JAX_DISTRIBUTED=1 (launch/tpu_pod.sh), a multi-host TPU slice
  (TPU_WORKER_HOSTNAMES lists several hosts), SLURM or Open MPI with several tasks, or an
  explicit JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID (e.g. several
  CPU processes on one machine).
  """
  if not _multi_process_env():
    return False
  import jax
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  else:
    jax.distributed.initialize()
  return True


def _unknown_field_message(argv, error: Exception) -> str | None:
  """One line for ml_collections' error about a field a config does not have (a --config.*
  override, or a config file setting a field of a locked sub-config such as the model); None
  for any other error."""
  while error.args and isinstance(error.args[0], Exception):   # AttributeError(KeyError(...))
    error = error.args[0]
  text = str(error.args[0]) if error.args else ''
  found = (re.search(r'Key "([^"]+)" does not exist', text)
           or re.match(r"'([^']+)'(\n|$)", text))
  if not found:
    return None
  key = found.group(1)
  close = re.search(r'Did you mean "([^"]+)"', text)
  close = close.group(1) if close else None
  for arg in argv[1:]:
    parts = arg.split('=', 1)[0][len('--config.'):].split('.')
    if arg.startswith('--config.') and key in parts:
      hint = ''
      if close:
        hint = ' (did you mean ' + '.'.join(
            parts[:parts.index(key)] + [close] + parts[parts.index(key) + 1:]) + '?)'
      return (f'{arg.split("=", 1)[0]}: the config has no field {".".join(parts)}{hint}. '
              'Every field is declared in beit3_jax/defaults.py.')
  if 'does not exist' not in text and 'Did you mean' not in text:
    return None   # not ml_collections' message about a config's field
  source = 'the config file'
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith('--config='):
      source = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      source = argv[i + 1]
  return (f'{source} sets {key}, a field its config does not have'
          + (f' (did you mean {close}?)' if close else '') + '.')


def parse_flags(argv):
  """absl's flag parsing, where a field the config does not have (misspelled in an override or
  in the config file) exits with one message instead of a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = _unknown_field_message(argv, e)
    if message is None:
      raise
    raise SystemExit(f'Error: {message}') from None


def _evaluates(config) -> bool:
  """Whether the run reads a checkpoint instead of training (`mode='eval'` or 'submit'; only
  the finetune job declares `mode`)."""
  return 'mode' in config and config.mode in ('eval', 'submit')


def _report(config, result: dict) -> None:
  train, val = result['train'], result['val']
  shown = ('accuracy', 'usage', 'rec_loss', 'cider', 'bleu4', '_r1', 'r_mean')
  head = ('Evaluated' if _evaluates(config)
          else (f'Stopped ({result["stopped"]})' if result.get('stopped') else 'Finished')
          + f': loss {train.get("loss", float("nan")):.4f}')
  print(head + ''.join(f'; val {k} {v:.4f}' for k, v in sorted(val.items())
                       if any(s in k for s in shown)))
  print(f'Checkpoints: {result["checkpoints"]}')
  if result.get('best'):
    print(f'Best:        {result["best"]}')
  print(f'Metrics:     {result["metrics"]} (TensorBoard: {result["tensorboard"]})')


def _remote_fields(config, prefix: str = 'config.') -> dict[str, str]:
  """{'config.<field>': value} of every config field whose value is a URL (gs://...)."""
  found = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      found.update(_remote_fields(value, f'{prefix}{key}.'))
    elif isinstance(value, str) and paths.is_remote(value):
      found[f'{prefix}{key}'] = value
  return found


def run(config, workdir: str | None) -> dict:
  """Runs `config.job` (the config already checked) in `workdir`; returns the job's result."""
  entry = JOBS[config.job]
  if entry.trains and not workdir:
    raise app.UsageError(f'The {config.job} job needs --workdir.')
  job = entry.module
  # Before anything compiles: JAX fixes its cache directory at the first compile.
  loop.use_compilation_cache(config.get('compilation_cache_dir', ''))
  if hasattr(job, 'check'):
    job.check(config)   # what the job cannot start with, before the workdir is written
  paths.check_reachable({'--workdir': workdir or '', **_remote_fields(config)})
  if workdir and _evaluates(config):
    # Evaluation reads a run (or init_from) and adds val/ rows to its metrics; the run's own
    # config.json stays as it is.
    print(f'{"Predicting" if config.mode == "submit" else "Evaluating"} with this config '
          f'(mode={config.mode}; {workdir}/config.json is left as it is)')
  elif workdir:
    print(f'Saved the config to {save_run_config(config, workdir)}')
  result = job.run(config, workdir)
  if entry.trains and config.get('mode') != 'submit':
    _report(config, result)   # (submit printed where its file went)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/smoke.py')
  source = flags.FLAGS['config'].config_filename
  job = config.job if 'job' in config else None
  if job not in JOBS:
    raise app.UsageError(f'{source}: config.job={job!r}; known jobs: {", ".join(JOBS)}.')
  try:
    defaults.check_fields(config, source=source)
    defaults.check_values(config)
    workdir = _WORKDIR.value
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    maybe_initialize_distributed()
    if workdir and not paths.is_remote(workdir):
      workdir = os.path.abspath(workdir)
    print(f'Job: {job}; config {source}; workdir {workdir or "(none)"}')
    run(config, workdir)
  except (defaults.ConfigError, defaults.RunError, paths.StorageUnreachable) as e:
    raise SystemExit(f'Error: {e}') from None
  return 0


if __name__ == '__main__':
  sys.exit(app.run(main, flags_parser=parse_flags))
