"""The package's shape stays as docs/architecture.md draws it.

Every module of beit3_jax is parsed (nothing is imported); every `import` / `from ... import`
of a beit3_jax module counts, at the top of a module and inside functions alike.
- No import cycle between modules (a package's `__init__` and its own submodules excepted).
- The arrows between packages are exactly those the document's arrow table lists.
- The layering rules below hold.
- Function-local imports of beit3_jax modules (kept only for fast CLI starts) stay few.
- No code outside `tasks/` (and the data builders named after their data sets) spells a task's
  name: everything about a task goes through the task registry.
"""

from __future__ import annotations

import ast
import collections
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'beit3_jax'
DOC = ROOT / 'docs' / 'architecture.md'
TASK_NAMES = ('classification', 'retrieval', 'vqa', 'nlvr2', 'captioning')
MAX_LOCAL_IMPORTS = 12

# (importer, imported) package pairs that must never appear.
FORBIDDEN = {
    'models': ('trainer', 'jobs', 'data', 'tasks'),
    'data': ('models',),
    'convert': ('trainer', 'jobs'),
    'torch_files': ('trainer', 'jobs'),
    'torch_layout': ('trainer', 'jobs'),
    'params_io': ('trainer', 'jobs', 'tasks'),
    'sharding': ('models',),
    'trainer': ('jobs', 'tasks'),
    'tasks': ('jobs',),
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(ROOT).with_suffix('').parts
    out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path, source: str | None = None
             ) -> list[tuple[str, bool]]:
  """(imported beit3_jax module, inside a function?) for every import of module `name` (its
  file `path`, or the text `source`)."""
  tree = ast.parse(path.read_text() if source is None else source)
  found = []

  def resolve(node: ast.ImportFrom) -> str:
    if not node.level:
      return node.module or ''
    base = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
    base = base[:len(base) - (node.level - 1)]
    return '.'.join(base + ([node.module] if node.module else []))

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        found.extend((a.name, inner) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        module = resolve(child)
        for a in child.names:      # `from pkg import module` imports pkg.module
          target = f'{module}.{a.name}'
          found.append((target if target in MODULES else module, inner))
      visit(child, inner)
  visit(tree, False)
  return [(m, inner) for m, inner in found if m in MODULES and m != name]


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def package_of(module: str) -> str:
  """The room a module lives in: its subpackage (models, data, ...) or its own top-level
  module (convert, sharding, ...); the package's own __init__ is 'beit3_jax'."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else parts[0]


def package_arrows() -> set[tuple[str, str]]:
  arrows = set()
  for name, imports in IMPORTS.items():
    for target, _ in imports:
      a, b = package_of(name), package_of(target)
      if a != b and 'beit3_jax' not in (a, b):
        arrows.add((a, b))
  return arrows


def documented_arrows() -> set[tuple[str, str]]:
  """The arrow table of docs/architecture.md: lines `importer -> a, b, c` inside the fenced
  block that follows the line `<!-- arrows -->`."""
  text = DOC.read_text()
  block = re.search(r'<!-- arrows -->\s*```[a-z]*\n(.*?)```', text, re.S)
  assert block, f'{DOC} has no arrow table (a fenced block after <!-- arrows -->).'
  arrows = set()
  for line in block.group(1).splitlines():
    line = line.split('#')[0].strip()
    if not line:
      continue
    source, _, targets = line.partition('->')
    for target in targets.split(','):
      if target.strip():
        arrows.add((source.strip(), target.strip()))
  return arrows


def _cycle_pairs() -> list[tuple[str, str]]:
  edges = {name: {t for t, _ in imports} for name, imports in IMPORTS.items()}

  def reaches(a, b):
    stack, seen = [a], {a}
    while stack:
      for w in edges[stack.pop()]:
        if w == b:
          return True
        if w not in seen:
          seen.add(w)
          stack.append(w)
    return False

  def own_package(a, b):   # a package's __init__ and its submodules import each other freely
    return ((MODULES[a].name == '__init__.py' and b.startswith(a + '.'))
            or (MODULES[b].name == '__init__.py' and a.startswith(b + '.')))
  return sorted({tuple(sorted((a, b))) for a in edges for b in edges[a]
                 if reaches(b, a) and not own_package(a, b)})


def test_no_import_cycle():
  pairs = _cycle_pairs()
  assert not pairs, 'modules that import each other (directly or through others): ' + ', '.join(
      f'{a} <-> {b}' for a, b in pairs)


def test_arrows_are_the_documented_ones():
  actual, drawn = package_arrows(), documented_arrows()
  assert not actual - drawn, ('arrows the code has and docs/architecture.md does not draw: '
                              f'{sorted(actual - drawn)}')
  assert not drawn - actual, ('arrows docs/architecture.md draws and the code does not have: '
                              f'{sorted(drawn - actual)}')


@pytest.mark.parametrize('importer', sorted(FORBIDDEN))
def test_layering_rules(importer):
  bad = sorted((a, b) for a, b in package_arrows() if a == importer and b in FORBIDDEN[a])
  assert bad == [], f'{importer} must not import {FORBIDDEN[importer]}: {bad}'


def test_few_function_local_imports():
  local = sorted(f'{name} -> {target}' for name, imports in IMPORTS.items()
                 for target, inner in imports if inner)
  assert len(local) <= MAX_LOCAL_IMPORTS, local


def _task_name_literals() -> dict[str, list[int]]:
  """Module -> lines where a task's name stands alone as a string constant (docstrings and
  longer strings that mention it do not count)."""
  out = collections.defaultdict(list)
  for name, path in MODULES.items():
    rel = path.relative_to(PACKAGE).as_posix()
    if rel.startswith('tasks/') or rel.startswith('data/builders/'):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
        out[rel].append(node.lineno)
  return dict(out)


def test_task_names_only_in_the_task_registry():
  assert _task_name_literals() == {}


def test_the_checks_see_what_they_look_for():
  # The parser finds imports at the top and inside functions, relative ones too, and the
  # registry spells every task.
  source = ('from beit3_jax import tasks\n'
            'def f():\n'
            '  from ..trainer import loop\n'
            '  import beit3_jax.models.heads\n')
  assert sorted(_imports('beit3_jax.jobs.example', PACKAGE / 'jobs' / 'example.py', source)) == [
      ('beit3_jax.models.heads', True), ('beit3_jax.tasks', False),
      ('beit3_jax.trainer.loop', True)]
  assert ('jobs', 'trainer') in package_arrows()
  spelled = set()
  for path in (PACKAGE / 'tasks').glob('*.py'):
    spelled |= {n.value for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Constant) and n.value in TASK_NAMES}
  assert spelled == set(TASK_NAMES)
