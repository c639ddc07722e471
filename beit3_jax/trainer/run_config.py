"""The run's config in its workdir: written once, compared when the run resumes."""

from __future__ import annotations

import json

import ml_collections

from beit3_jax import defaults
from beit3_jax.defaults import RESUMABLE_CHANGES


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _declared_defaults(config) -> dict:
  """Dotted field -> declared default (as JSON values) of `config`'s job; {} for a config
  without a known job (e.g. one built by hand in a test)."""
  try:
    built = ml_collections.ConfigDict(defaults.defaults_for(config))
  except defaults.ConfigError:
    return {}
  return _flat(json.loads(built.to_json_best_effort()))


def save_run_config(config, workdir: str) -> str:
  """Writes the run's config as workdir/config.json (local or gs://).

  A workdir that already has a config.json is a run being resumed: the new config may differ
  only in `defaults.RESUMABLE_CHANGES` (e.g. the mesh shape); then the old config is appended
  to config_history.jsonl and the new one written. A field that the old config.json lacks (a
  field declared after the run started) counts as unchanged when the new config has its
  declared default (`defaults.defaults_for`). Any other difference stops the run, so that a
  resumed run is the run that was started and nothing in the workdir is silently replaced.
  """
  import jax
  from etils import epath
  directory = epath.Path(workdir)
  path = directory / 'config.json'
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if path.exists():
    old_text = path.read_text()
    if old_text == text:
      return str(path)
    old, new = _flat(json.loads(old_text)), _flat(json.loads(text))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    added = [k for k in changed if k not in old]
    if added:
      declared = _declared_defaults(config)
      changed = [k for k in changed
                 if not (k in added and k in declared and new[k] == declared[k])]
    fixed = [k for k in changed  # a listed field covers its sub-fields (data.workers.image)
             if not any(k == r or k.startswith(r + '.') for r in RESUMABLE_CHANGES)]
    if fixed:
      raise SystemExit(f'{path} holds a different config ({", ".join(fixed)}): use a new '
                       '--workdir, or delete it on purpose. Fields that may change when a run '
                       f'resumes: {", ".join(RESUMABLE_CHANGES)}.')
    if changed:
      print('Resuming with changed ' + ', '.join(f'{k}: {old.get(k)} -> {new.get(k)}'
                                                 for k in changed))
    if jax.process_index() == 0:
      history = directory / 'config_history.jsonl'
      previous = history.read_text() if history.exists() else ''
      history.write_text(previous + json.dumps(json.loads(old_text)) + '\n')
      path.write_text(text)
    return str(path)
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return str(path)
