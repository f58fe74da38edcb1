"""The tasks: one module and one `Task` record each (see `tasks.base`)."""

from __future__ import annotations

from . import grounding, markdown, ocr
from .base import Task, WrongModel

__all__ = ["TASKS", "Task", "WrongModel", "find_task", "tasks_for"]

TASKS: dict[str, Task] = {task.name: task for task in (ocr.TASK, markdown.TASK, grounding.TASK)}


def find_task(name: str) -> Task:
    """The task called ``name`` or one of its aliases (``markdown`` for ``md``, ``grounding`` for ``ground``)."""
    for task in TASKS.values():
        if name == task.name or name in task.aliases:
            return task
    names = sorted(n for task in TASKS.values() for n in (task.name, *task.aliases))
    raise ValueError(f"unknown task {name!r} (expected one of {names})")


def tasks_for(kind: str) -> list[Task]:
    """The tasks a model of this kind ("kosmos-2.5", "kosmos-2") can do, the default first."""
    return [task for task in TASKS.values() if task.model_kind == kind]
