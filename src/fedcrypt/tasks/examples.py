"""Ready-made built-in tasks by reference (``--task fedcrypt.tasks.examples:wdbc_mlp``).

Each is a zero-argument function returning a :class:`fedcrypt.Task`, which
:func:`fedcrypt.load_task` calls.
"""

from __future__ import annotations

from fedcrypt.task import Task
from fedcrypt.tasks.builtin import builtin_task


def wdbc_mlp() -> Task:
    """The embedded default: scikit-learn's Wisconsin breast-cancer table with an MLP."""
    return builtin_task(dataset="wdbc", model="mlp")
