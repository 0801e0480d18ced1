"""fedcrypt: privacy-preserving federated learning for hospital consortia.

The public API::

    import fedcrypt

    task = fedcrypt.Task(name="my-study", model=make_model, datasets=make_datasets)
    result = fedcrypt.simulate(task, protection="he", clients=3, rounds=5, out="run")
    result.final["auc"], result.run_dir

:class:`Task` (a model factory and each hospital's :class:`HospitalDatasets`),
:func:`simulate` (Flower's simulation engine on this machine; keyword arguments mirror
``fedcrypt simulate``) and :func:`load_task` (``FILE.py:NAME`` or
``package.module:NAME``). The built-in datasets and models are tasks made with the same
API (:func:`fedcrypt.tasks.builtin.builtin_task`).
"""

from fedcrypt.api import RunResult, simulate
from fedcrypt.task import HospitalDatasets, Task, TaskInfo, TrainSettings, inspect_task, load_task

__version__ = "0.2.0"

__all__ = [
    "HospitalDatasets",
    "RunResult",
    "Task",
    "TaskInfo",
    "TrainSettings",
    "__version__",
    "inspect_task",
    "load_task",
    "simulate",
]
