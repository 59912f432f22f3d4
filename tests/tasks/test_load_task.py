from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.errors import ConfigError, TaskError
from fedmq.tasks import BUILTIN_TASKS, DigitsTask, MnistTask, PartitionSpec, Task, load_task

HELPER = "helper_tasks"


@pytest.fixture(autouse=True)
def helper_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_builtin_tasks_listed() -> None:
    assert BUILTIN_TASKS == {"digits": DigitsTask, "mnist": MnistTask}
    for name, task_class in BUILTIN_TASKS.items():
        assert task_class.name == name


def test_builtin_digits_loads() -> None:
    task = load_task("digits")

    assert isinstance(task, DigitsTask)
    assert task.name == "digits"


def test_builtin_mnist_loads() -> None:
    task = load_task("mnist")

    assert isinstance(task, MnistTask)
    assert task.name == "mnist"


def test_builtin_options_reach_constructor() -> None:
    task = load_task("digits", hidden_units=32, holdout_seed=5)

    assert isinstance(task, DigitsTask)
    assert task.holdout_seed == 5
    model = task.build_model()
    assert model.state_dict()["fc1.weight"].shape == (32, 64)


def test_builtin_invalid_option_value() -> None:
    with pytest.raises(ConfigError, match="hidden_units must be an integer >= 1, but got 0"):
        load_task("digits", hidden_units=0)


def test_builtin_unknown_option() -> None:
    with pytest.raises(TaskError, match="'digits' cannot be built with options") as caught:
        load_task("digits", hidden_layers=3)

    assert "hidden_layers" in str(caught.value)


def test_import_path_class() -> None:
    task = load_task(f"{HELPER}:TinyTask", num_features=5)

    assert isinstance(task, Task)
    assert task.name == "tiny"
    assert task.build_model().weight.shape == (2, 5)


def test_import_path_instance() -> None:
    task = load_task(f"{HELPER}:TINY_TASK")

    assert task.name == "tiny"
    assert task.build_model().weight.shape == (2, 3)


def test_import_path_factory() -> None:
    task = load_task(f"{HELPER}:make_tiny_task")
    wider = load_task(f"{HELPER}:make_tiny_task", num_features=7)

    assert task.build_model().weight.shape == (2, 4)
    assert wider.build_model().weight.shape == (2, 7)


def test_import_path_dotted_attribute() -> None:
    task = load_task(f"{HELPER}:Holder.task_class")

    assert task.name == "tiny"


def test_import_path_task_trains() -> None:
    task = load_task(f"{HELPER}:TinyTask")
    data = task.load_local_data(0, 1, PartitionSpec())

    result = task.train(task.build_model(), data, task.default_train_config())

    assert result.num_samples == 6
    assert result.num_steps == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "task spec must be a non-empty string"),
        ("cifar", "unknown task 'cifar': expected a built-in task (digits, mnist)"),
        ("no_such_module_for_fedmq:Task", "module 'no_such_module_for_fedmq' not found"),
        (f"{HELPER}:MissingTask", f"module '{HELPER}' has no attribute 'MissingTask'"),
        (f"{HELPER}:Holder.missing", f"module '{HELPER}' has no attribute 'Holder.missing'"),
        (f"{HELPER}:NotATask", "is the class NotATask, which is not a Task subclass"),
        (f"{HELPER}:TASK_COUNT", "is a int; expected a Task subclass, a Task instance"),
        (f"{HELPER}:make_string", "the factory returned a str, not a Task"),
        (f"{HELPER}:failing_factory", "building the task failed: RuntimeError('the dataset directory is missing')"),
        (f"{HELPER}:IncompleteTask", "'helper_tasks:IncompleteTask' cannot be built"),
        (f"{HELPER}:NamelessTask", "NamelessTask.name must be a non-empty string, but got ''"),
        (f"{HELPER}:", "must have the form 'package.module:attr'"),
        (":TinyTask", "must have the form 'package.module:attr'"),
    ],
)
def test_bad_spec_raises_task_error(spec: str, message: str) -> None:
    with pytest.raises(TaskError) as caught:
        load_task(spec)

    assert message in str(caught.value)
    if spec:
        assert repr(spec) in str(caught.value)


def test_instance_rejects_options() -> None:
    with pytest.raises(TaskError, match="is a Task instance and accepts no options, but got \\['num_features'\\]"):
        load_task(f"{HELPER}:TINY_TASK", num_features=2)


def test_module_import_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fedmq_broken_task.py").write_text("import fedmq_missing_dependency\n")
    (tmp_path / "fedmq_raising_task.py").write_text("raise RuntimeError('bad configuration file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(TaskError) as missing_dependency:
        load_task("fedmq_broken_task:Task")
    with pytest.raises(TaskError) as raising:
        load_task("fedmq_raising_task:Task")

    assert "importing module 'fedmq_broken_task' failed" in str(missing_dependency.value)
    assert "fedmq_missing_dependency" in str(missing_dependency.value)
    assert "importing module 'fedmq_raising_task' failed" in str(raising.value)
    assert "bad configuration file" in str(raising.value)


def test_non_string_spec() -> None:
    with pytest.raises(TaskError, match="task spec must be a non-empty string, but got 3"):
        load_task(3)  # type: ignore[arg-type]
