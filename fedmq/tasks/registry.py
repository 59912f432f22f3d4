"""Look up a task by name or by import path."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from fedmq.errors import ConfigError, TaskError
from fedmq.tasks.base import Task
from fedmq.tasks.digits import DigitsTask
from fedmq.tasks.mnist import MnistTask

logger = logging.getLogger(__name__)

BUILTIN_TASKS: dict[str, type[Task]] = {
    DigitsTask.name: DigitsTask,
    MnistTask.name: MnistTask,
}


def load_task(spec: str, **options: object) -> Task:
    """Build the task that ``spec`` names, passing ``options`` as keyword arguments.

    ``spec`` is a built-in name (a key of ``BUILTIN_TASKS``) or an import path
    ``package.module:attr``, where ``attr`` may be dotted and is a Task subclass, a
    Task instance, or a factory that returns a Task. An instance accepts no options.

    Raises TaskError, naming the spec, when the module is not found or fails to
    import, the attribute is missing, the object is not a Task, the options do not
    fit, the constructor raises, or the task has no name. A ConfigError from the
    task's own option checks passes through unchanged.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(f"task spec must be a non-empty string, but got {spec!r}")
    if spec in BUILTIN_TASKS:
        return _build(spec, BUILTIN_TASKS[spec], options)
    if ":" not in spec:
        raise TaskError(
            f"unknown task {spec!r}: expected a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) "
            "or an import path 'package.module:attr'"
        )

    module_name, _, attribute_path = spec.partition(":")
    if not module_name or not attribute_path:
        raise TaskError(f"task spec {spec!r} must have the form 'package.module:attr'")
    target = _resolve(spec, module_name, attribute_path)

    if isinstance(target, Task):
        if options:
            raise TaskError(
                f"task {spec!r} is a Task instance and accepts no options, but got {sorted(options)}"
            )
        return _checked(spec, target)
    if isinstance(target, type) and not issubclass(target, Task):
        raise TaskError(f"task {spec!r} is the class {target.__qualname__}, which is not a Task subclass")
    if not callable(target):
        raise TaskError(
            f"task {spec!r} is a {type(target).__name__}; expected a Task subclass, a Task instance "
            "or a factory that returns a Task"
        )
    return _build(spec, target, options)


def _resolve(spec: str, module_name: str, attribute_path: str) -> object:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise TaskError(f"task {spec!r}: module {module_name!r} not found") from error
        raise TaskError(f"task {spec!r}: importing module {module_name!r} failed: {error}") from error
    except Exception as error:
        raise TaskError(f"task {spec!r}: importing module {module_name!r} failed: {error!r}") from error

    target: object = module
    for part in attribute_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as error:
            raise TaskError(
                f"task {spec!r}: module {module_name!r} has no attribute {attribute_path!r}"
            ) from error
    return target


def _build(spec: str, factory: Callable[..., object], options: dict[str, object]) -> Task:
    try:
        task = factory(**options)
    except ConfigError:
        raise
    except TypeError as error:
        raise TaskError(f"task {spec!r} cannot be built with options {options!r}: {error}") from error
    except Exception as error:
        raise TaskError(f"task {spec!r}: building the task failed: {error!r}") from error

    if not isinstance(task, Task):
        raise TaskError(f"task {spec!r}: the factory returned a {type(task).__name__}, not a Task")
    return _checked(spec, task)


def _checked(spec: str, task: Task) -> Task:
    name = getattr(task, "name", None)
    if not isinstance(name, str) or not name:
        raise TaskError(
            f"task {spec!r}: {type(task).__name__}.name must be a non-empty string, but got {name!r}"
        )
    logger.debug("Loaded task %r from %r", task, spec)
    return task
