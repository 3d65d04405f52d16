"""Built-in tasks: seeded problem generators with verifiers (``--dataset task:NAME``)."""

from rlxf.tasks.arithmetic import ArithmeticTask
from rlxf.tasks.multiplication import MultiplicationTask
from rlxf.tasks.base import PAIR_KINDS, SPLITS, Problem, Task, completion_score, extract_answer
from rlxf.tasks.sorting import SortingTask

TASKS: dict[str, type[Task]] = {"arithmetic": ArithmeticTask, "multiplication": MultiplicationTask,
                                 "sorting": SortingTask}


def get_task(name: str) -> Task:
    """Return a built-in task by name (``arithmetic``, ``multiplication``, ``sorting``)."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "PAIR_KINDS", "SPLITS", "ArithmeticTask", "MultiplicationTask", "Problem", "SortingTask", "Task",
           "completion_score", "extract_answer", "get_task"]
