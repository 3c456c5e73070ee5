"""The tasks: one record each (`Task`), looked up by a config's `task` field."""

from __future__ import annotations

import ml_collections

from slotjax.tasks.discovery import DISCOVERY
from slotjax.tasks.set_prediction import SET_PREDICTION
from slotjax.tasks.task import MODEL_ARGUMENTS, MODEL_FIELDS, DataNeeds, Task

TASKS: dict[str, Task] = {task.name: task for task in (DISCOVERY, SET_PREDICTION)}


def task_named(name: str) -> Task:
    """The task called `name`; ValueError naming the tasks for another name."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not a task; use --task={' or --task='.join(TASKS)}.")
    return TASKS[name]


def task_of(config: ml_collections.ConfigDict) -> Task:
    """The task `config` trains."""
    return task_named(config.get("task"))


__all__ = ["MODEL_ARGUMENTS", "MODEL_FIELDS", "TASKS", "DataNeeds", "Task", "task_named", "task_of"]
