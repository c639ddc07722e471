"""Fine-tuning tasks: one module per task behind a registry, plus what they share.

    from beit3_jax import tasks
    task = tasks.get('vqa')          # a `tasks.base.Task`
    tasks.names()                    # the registered names

Adding a task: a module that defines a `Task` subclass and registers its instance
(`TASK = registry.register(MyTask())`), and one import line below.
"""

from beit3_jax.tasks.registry import get, names, register, unregister

# Each module registers its task when imported.
from beit3_jax.tasks import classification  # noqa: E402,F401
from beit3_jax.tasks import vqa  # noqa: E402,F401
from beit3_jax.tasks import nlvr2  # noqa: E402,F401
from beit3_jax.tasks import retrieval  # noqa: E402,F401
from beit3_jax.tasks import captioning  # noqa: E402,F401

__all__ = ['get', 'names', 'register', 'unregister']
