"""Task registry: `get_task(name, **kwargs)` builds any task registered with `@register_task`."""

from tlt_jax.data.tasks.base import (Example, Task, TraceCheck, get_task, register_task, registered_tasks,
                                     task_options)
from tlt_jax.data.tasks.arith import ArithTask
from tlt_jax.data.tasks.file_task import FileTask, MathFileTask, VerlFileTask
from tlt_jax.data.tasks.reverse_arith import ReverseAddTask, ReverseCopyTask
from tlt_jax.data.tasks.zebra import ZebraTask

__all__ = ["Example", "Task", "TraceCheck", "get_task", "register_task", "registered_tasks", "task_options",
           "ArithTask", "FileTask", "MathFileTask", "VerlFileTask", "ZebraTask"]
