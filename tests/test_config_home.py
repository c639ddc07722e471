"""One home for config defaults (beit3_jax/defaults.py): every field declared with a doc,
unknown fields refused by name before anything is built, resumes across newly declared fields,
and a missing visual tokenizer named with the command that makes it."""

import json
import os
import subprocess
import sys
import time

import pytest

from beit3_jax import defaults, tasks
from beit3_jax.jobs import pretraining
from beit3_jax.trainer import run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(tmp_path, config_text, *flags, timeout=120):
  """`python -m beit3_jax.main` on a config file with `config_text`: (process, seconds)."""
  config = tmp_path / 'config.py'
  config.write_text(config_text)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  cmd = [sys.executable, '-m', 'beit3_jax.main', f'--config={config}',
         f'--workdir={tmp_path / "workdir"}', *flags]
  started = time.perf_counter()
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)
  return proc, time.perf_counter() - started


MISSPELLED = '''
from beit3_jax.defaults import pretrain_config


def get_config(arg=None):
  config = pretrain_config()
  config.optimizer.lrr = 1
  return config
'''


def test_a_config_file_with_a_misspelled_field_is_refused_by_name(tmp_path):
  proc, _ = _main(tmp_path, MISSPELLED)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert 'optimizer.lrr (did you mean optimizer.lr?)' in proc.stderr
  assert str(tmp_path / 'config.py') in proc.stderr
  assert 'Traceback' not in proc.stderr
  # Refused before anything ran: no job line, nothing written to the workdir.
  assert 'Job:' not in proc.stdout
  assert not (tmp_path / 'workdir').exists()


def _ml_collections_error(action):
  try:
    action()
  except (AttributeError, KeyError) as e:
    return e
  raise AssertionError('no error')


def test_misspelled_overrides_and_locked_fields_get_one_line():
  from beit3_jax import main
  config = defaults.pretrain_config()
  config.lock()
  # What config_flags raises for --config.optimizer.lrr=3 (the path is looked up, then set).
  error = _ml_collections_error(lambda: config.optimizer.lrr)
  argv = ['main', '--config=c.py', '--config.optimizer.lrr=3']
  assert main._unknown_field_message(argv, AttributeError(error)) == (
      '--config.optimizer.lrr: the config has no field optimizer.lrr (did you mean '
      'optimizer.lr?). Every field is declared in beit3_jax/defaults.py.')
  # A config file setting a field of the (locked) model config.
  error = _ml_collections_error(lambda: setattr(config.model, 'embed_dimm', 1))
  assert main._unknown_field_message(['main', '--config', 'c.py'], error) == (
      'c.py sets embed_dimm, a field its config does not have (did you mean embed_dim?).')
  assert main._unknown_field_message(argv, KeyError('something else')) is None


def test_check_fields_names_every_unknown_field():
  config = defaults.pretrain_config()
  config.data.flip_prob = 0.5          # a fine-tuning field, not a pretraining one
  config.seeds = 1
  with pytest.raises(defaults.UnknownFieldError) as error:
    defaults.check_fields(config, source='x.py')
  message = str(error.value)
  assert message.startswith('x.py sets field(s) the pretrain job does not have: ')
  assert 'data.flip_prob' in message and 'seeds (did you mean seed?)' in message
  # Free-form sub-configs and whole model configs are checked as declared.
  config = defaults.pretrain_config()
  config.data.fields = {'pair': {'caption': 'caption'}}
  config.model = defaults.demo_model()
  defaults.check_fields(config)


@pytest.mark.parametrize('job', ['pretrain', 'tokenizer', 'smoke',
                                 *[f'finetune:{t}' for t in tasks.names()]])
def test_every_field_has_a_doc_and_its_config_passes_the_check(job):
  name, _, task = job.partition(':')
  fields = {'pretrain': defaults.pretrain_fields, 'tokenizer': defaults.tokenizer_fields,
            'smoke': defaults.smoke_fields,
            'finetune': lambda: defaults.finetune_fields(task)}[name]()
  for field, _, doc in fields:
    assert isinstance(doc, str) and doc.strip(), field
  assert set(defaults.docs(name, task)) == {f for f, _, _ in fields}
  config = {'pretrain': defaults.pretrain_config, 'tokenizer': defaults.tokenizer_config,
            'smoke': defaults.smoke_config,
            'finetune': lambda: defaults.finetune_config(task)}[name]()
  assert config.job == name
  defaults.check_fields(config)
  # Every training job's optimizer has every field make_optimizer reads.
  if name != 'smoke':
    assert set(config.optimizer) >= {'lr', 'min_lr', 'warmup_steps', 'b1', 'b2', 'eps',
                                     'weight_decay', 'clip_norm', 'layer_decay',
                                     'task_head_lr_weight'}


def test_smoke_config_file_is_the_declared_one():
  import importlib.util
  spec = importlib.util.spec_from_file_location('smoke_cfg', os.path.join(REPO, 'configs',
                                                                           'smoke.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config('small').to_dict() == defaults.smoke_config('small').to_dict()


def test_demo_config_uses_the_demo_model():
  import importlib.util
  spec = importlib.util.spec_from_file_location('demo_cfg', os.path.join(
      REPO, 'configs', 'pretrain', 'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.model.to_dict() == defaults.demo_model(init='beit').to_dict()
  assert config.tokenizer.train_if_missing is True
  defaults.check_fields(config)


@pytest.mark.parametrize('name', ['demo', 'base', 'large', 'giant'])
def test_pretraining_recipes_use_the_paper_s_beit_init(name):
  """The paper pretrains with BEiT's init (the output projections of layer l scaled by
  1/sqrt(2l)), not the truncated normal of a freshly built unilm model."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f'pretrain_{name}', os.path.join(
      REPO, 'configs', 'pretrain', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config().model.init == 'beit'
  assert defaults.pretrain_config().model.init == 'beit'


def _saved(workdir):
  return json.loads((workdir / 'config.json').read_text())


def _drop(tree, dotted):
  *parents, leaf = dotted.split('.')
  for p in parents:
    tree = tree[p]
  del tree[leaf]


def test_resumable_changes_are_declared_in_defaults():
  assert run_config.RESUMABLE_CHANGES is defaults.RESUMABLE_CHANGES
  assert 'tokenizer.train_if_missing' in defaults.RESUMABLE_CHANGES


def test_a_field_missing_from_a_saved_config_at_its_default_counts_as_unchanged(tmp_path,
                                                                                capsys):
  config = defaults.pretrain_config()
  run_config.save_run_config(config, str(tmp_path))
  # A config.json written before these fields were declared.
  saved = _saved(tmp_path)
  _drop(saved, 'tokenizer.train_if_missing')
  _drop(saved, 'optimizer.task_head_lr_weight')
  (tmp_path / 'config.json').write_text(json.dumps(saved, indent=2, sort_keys=True))
  capsys.readouterr()
  run_config.save_run_config(config, str(tmp_path))
  assert 'Resuming with changed' not in capsys.readouterr().out
  # config.json now has the fields; the old one is kept in the history.
  assert _saved(tmp_path)['optimizer']['task_head_lr_weight'] == 1.0
  history = (tmp_path / 'config_history.jsonl').read_text().splitlines()
  assert 'task_head_lr_weight' not in history[-1]


def test_a_missing_field_with_another_value_is_still_refused(tmp_path):
  config = defaults.finetune_config('classification')
  run_config.save_run_config(config, str(tmp_path))
  saved = _saved(tmp_path)
  _drop(saved, 'data.flip_prob')
  (tmp_path / 'config.json').write_text(json.dumps(saved, indent=2, sort_keys=True))
  config.data.flip_prob = 0.0
  with pytest.raises(SystemExit, match='data.flip_prob'):
    run_config.save_run_config(config, str(tmp_path))
  config.data.flip_prob = 0.5   # the declared default: resumes
  run_config.save_run_config(config, str(tmp_path))


def test_a_missing_resumable_field_with_another_value_resumes_and_says_so(tmp_path, capsys):
  config = defaults.pretrain_config()
  run_config.save_run_config(config, str(tmp_path))
  saved = _saved(tmp_path)
  _drop(saved, 'tokenizer.train_if_missing')
  (tmp_path / 'config.json').write_text(json.dumps(saved, indent=2, sort_keys=True))
  config.tokenizer.train_if_missing = True
  run_config.save_run_config(config, str(tmp_path))
  assert ('Resuming with changed tokenizer.train_if_missing: None -> True'
          in capsys.readouterr().out)


def test_a_missing_tokenizer_path_names_the_commands_that_make_it(tmp_path):
  config = defaults.pretrain_config()
  config.tokenizer.path = str(tmp_path / 'vqkd')
  with pytest.raises(defaults.ConfigError) as error:
    pretraining.visual_tokenizer_path(config)
  message = str(error.value)
  assert (f'python -m beit3_jax.convert to-flax \'<vqkd .pth>\' {tmp_path / "vqkd"} '
          '--model vqkd --variant base') in message
  assert 'python -m beit3_jax.main --config=configs/pretrain/tokenizer_base.py' in message
  assert f'--config.output={tmp_path / "vqkd"}' in message


def test_a_missing_train_config_tokenizer_names_the_command_that_trains_it(tmp_path):
  config = defaults.pretrain_config()
  config.tokenizer.train_config = 'configs/pretrain/tokenizer_demo.py'
  config.data.data_dir = str(tmp_path)
  out = tmp_path / 'tokenizers' / 'tokenizer_demo'
  with pytest.raises(defaults.ConfigError) as error:
    pretraining.visual_tokenizer_path(config)
  assert (f'python -m beit3_jax.main --config=configs/pretrain/tokenizer_demo.py '
          f'--workdir={out}_run --config.output={out} --config.data.data_dir={tmp_path}'
          in str(error.value))
  assert '--config.tokenizer.train_if_missing=True' in str(error.value)
  config.tokenizer.train_if_missing = True
  assert pretraining.visual_tokenizer_path(config) == str(out)


def test_the_demo_says_it_trains_its_tokenizer_first(tmp_path, monkeypatch, capsys):
  from beit3_jax import params_io
  from beit3_jax.jobs import tokenizer_training
  calls = []
  monkeypatch.setattr(tokenizer_training, 'train_into', lambda config, **kw: (
      calls.append((config, kw)), {'val': {'vqkd/rec_loss': 0.5}})[1])
  monkeypatch.setattr(params_io, 'load_vqkd_params', lambda path: ({}, {}, 'cfg'))
  config = defaults.pretrain_config()
  config.tokenizer.train_config = 'configs/pretrain/tokenizer_demo.py'
  config.tokenizer.train_if_missing = True
  config.data.data_dir = str(tmp_path)
  monkeypatch.chdir(REPO)
  _, _, path = pretraining.load_visual_tokenizer(config)
  out = str(tmp_path / 'tokenizers' / 'tokenizer_demo')
  assert path == out
  (tok_config, kw), = calls
  assert tok_config.job == 'tokenizer' and kw == {'output': out, 'data_dir': str(tmp_path)}
  printed = capsys.readouterr().out
  assert f'No visual tokenizer at {out} yet: training it first' in printed
  assert '250 steps' in printed and 'about 2 minutes' in printed and f'{out}_run' in printed


MISSING_TOKENIZER = '''
from beit3_jax.defaults import pretrain_config


def get_config(arg=None):
  config = pretrain_config()
  config.tokenizer.train_config = 'configs/pretrain/tokenizer_demo.py'
  config.data.data_dir = {data_dir!r}
  return config
'''


def test_main_exits_with_the_command_when_the_tokenizer_is_missing(tmp_path):
  proc, _ = _main(tmp_path, MISSING_TOKENIZER.format(data_dir=str(tmp_path / 'data')))
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.startswith('Error: No visual tokenizer at ')
  assert '--config=configs/pretrain/tokenizer_demo.py' in proc.stderr
  assert not (tmp_path / 'data').exists()        # nothing was built
  assert not (tmp_path / 'workdir').exists()     # nor the workdir written


def test_smoke_job_runs_from_its_module(tmp_path, fast_compile):
  from conftest import tiny_config
  from beit3_jax.jobs import smoke
  config = defaults.smoke_config()
  config.model = tiny_config(depth=1)
  summary = smoke.run(config, str(tmp_path))
  assert summary['outputs']['image']['encoder_out_shape'] == [1, 17, 48]
  assert all(r['finite'] for r in summary['outputs'].values())
  assert (tmp_path / 'smoke_summary.json').exists()
  assert smoke.synthetic_image(8).shape == (8, 8, 3)
