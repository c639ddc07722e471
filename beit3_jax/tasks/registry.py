"""The table of fine-tuning tasks: name -> `Task` (see `beit3_jax.tasks.base`).

The fine-tuning job, its evaluation, predict and convert look a task up here by name; nothing
else branches on a task's name. `beit3_jax/tasks/__init__.py` registers the shipped tasks; a
new task is one module plus its line there (or a `register` call of its own, e.g. in a test).
"""

from __future__ import annotations

from beit3_jax.tasks.base import Task

_TASKS: dict[str, Task] = {}


def register(task: Task, *, replace: bool = False) -> Task:
  """Adds `task` under `task.name`; a second task of one name is refused unless `replace`."""
  if not task.name:
    raise ValueError(f'{type(task).__name__} has no name.')
  if task.name in _TASKS and not replace:
    raise ValueError(f'A task named {task.name!r} is registered already.')
  _TASKS[task.name] = task
  return task


def unregister(name: str) -> None:
  _TASKS.pop(name, None)


def names() -> tuple[str, ...]:
  """The registered task names, in registration order."""
  return tuple(_TASKS)


def get(name: str) -> Task:
  """The task registered as `name`; ValueError naming the known tasks otherwise."""
  if name not in _TASKS:
    raise ValueError(f'task={name!r}; known tasks: {", ".join(_TASKS) or "none"}.')
  return _TASKS[name]
