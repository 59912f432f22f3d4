"""Settings from flags, FEDMQ_* variables and a TOML file: precedence, validation, display."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fedmq.cli import build_parser, main
from fedmq.config import (
    REDACTED,
    UNSET,
    address,
    format_settings,
    integer,
    number,
    redact_url_password,
    redact_value,
    resolve_settings,
    settings_json,
)
from fedmq.errors import ConfigError

REQUIRED = ["--task", "digits", "--rounds", "3"]


def resolve(argv: list[str], environ: dict[str, str] | None = None, **kwargs: bool):  # type: ignore[no-untyped-def]
    return resolve_settings(build_parser(), argv, environ or {}, **kwargs)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fedmq.toml"
    path.write_text(text, encoding="utf-8")
    return path


# Precedence


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        """
[coordinator]
rounds = 7
round-deadline-s = 11
join_timeout_s = 12
min-workers = 4
""",
    )
    environ = {"FEDMQ_ROUNDS": "8", "FEDMQ_ROUND_DEADLINE_S": "21", "FEDMQ_CONFIG": str(config)}
    resolved = resolve(["coordinator", "--task", "digits", "--rounds", "9"], environ)
    args = resolved.namespace

    assert args.rounds == 9
    assert resolved.source("rounds") == "flag --rounds"
    assert args.round_deadline_s == 21.0
    assert resolved.source("round_deadline_s") == "env FEDMQ_ROUND_DEADLINE_S"
    assert args.join_timeout_s == 12.0
    assert resolved.source("join_timeout_s") == f"file {config} [coordinator] join_timeout_s"
    assert args.min_workers == 4
    assert args.quorum_fraction == 1.0
    assert resolved.source("quorum_fraction") == "default"


def test_config_flag_wins_over_env(tmp_path: Path) -> None:
    from_env = tmp_path / "env.toml"
    from_env.write_text("[coordinator]\nrounds = 5\n", encoding="utf-8")
    from_flag = tmp_path / "flag.toml"
    from_flag.write_text("[coordinator]\nrounds = 6\n", encoding="utf-8")

    resolved = resolve(["coordinator", "--task", "digits", "--config", str(from_flag)], {"FEDMQ_CONFIG": str(from_env)})

    assert resolved.namespace.rounds == 6
    assert resolved.config_path == from_flag
    assert resolved.source("config") == "flag --config"


def test_file_sets_required_options(tmp_path: Path) -> None:
    config = write_toml(tmp_path, '[worker]\ntask = "digits"\nworker-id = "w-7"\nthreads = 2\n')

    args = resolve(["worker", "--config", str(config)]).namespace

    assert args.task == "digits"
    assert args.worker_id == "w-7"
    assert args.threads == 2


def test_file_tables_apply_per_command(tmp_path: Path) -> None:
    config = write_toml(tmp_path, '[coordinator]\ntask = "mnist"\nrounds = 2\n\n[worker]\ntask = "digits"\n')

    coordinator = resolve(["coordinator", "--config", str(config)]).namespace
    worker = resolve(["worker", "--config", str(config)]).namespace

    assert coordinator.task == "mnist"
    assert worker.task == "digits"


def test_top_level_keys_set_global_options(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'log-level = "DEBUG"\nlog_json = true\n\n[worker]\ntask = "digits"\n')

    resolved = resolve(["worker", "--config", str(config)])

    assert resolved.namespace.log_level == "DEBUG"
    assert resolved.namespace.log_json is True
    assert resolved.source("log_level") == f"file {config} log-level"


def test_command_table_overrides_top_level(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'log-level = "DEBUG"\n\n[worker]\ntask = "digits"\nlog-level = "WARNING"\n')

    assert resolve(["worker", "--config", str(config)]).namespace.log_level == "WARNING"


def test_env_sets_global_options() -> None:
    resolved = resolve(["worker", "--task", "digits"], {"FEDMQ_LOG_LEVEL": "ERROR", "FEDMQ_LOG_JSON": "yes"})

    assert resolved.namespace.log_level == "ERROR"
    assert resolved.namespace.log_json is True
    assert resolved.source("log_json") == "env FEDMQ_LOG_JSON"


def test_env_false_word_for_flag() -> None:
    args = resolve(["worker", "--task", "digits"], {"FEDMQ_LOG_JSON": "off"}).namespace

    assert args.log_json is False


def test_broker_url_from_env() -> None:
    resolved = resolve(["worker", "--task", "digits"], {"FEDMQ_BROKER_URL": "amqp://u:p@broker:5672/%2F"})

    assert resolved.namespace.broker_url == "amqp://u:p@broker:5672/%2F"
    assert resolved.source("broker_url") == "env FEDMQ_BROKER_URL"


def test_string_default_goes_through_type() -> None:
    args = resolve(["coordinator", *REQUIRED]).namespace

    assert args.metrics_address == "127.0.0.1:9464"


def test_commands_outside_config_ignore_env(tmp_path: Path) -> None:
    args = resolve(["report", str(tmp_path)], {"FEDMQ_OUT": "/elsewhere"}).namespace

    assert args.out is None
    assert args.run_dir == tmp_path


def test_relaxed_parse_restores_nothing_unset() -> None:
    resolved = resolve(["coordinator", *REQUIRED])

    for name, setting in resolved.settings.items():
        assert setting.value is not UNSET, name
        assert getattr(resolved.namespace, name) is not UNSET, name


# Validation


def test_missing_required_names_every_source() -> None:
    with pytest.raises(ConfigError) as error:
        resolve(["coordinator", "--task", "digits"])

    message = str(error.value)
    assert "--rounds" in message
    assert "FEDMQ_ROUNDS" in message
    assert "[coordinator]" in message


def test_missing_required_allowed_for_display() -> None:
    resolved = resolve(["coordinator", "--task", "digits"], allow_missing=True)

    assert [setting.name for setting in resolved.missing] == ["rounds"]
    assert "<required, not set>" in format_settings(resolved)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("FEDMQ_ROUNDS", "abc", "an integer >= 1"),
        ("FEDMQ_ROUNDS", "0", "an integer >= 1"),
        ("FEDMQ_QUORUM_FRACTION", "1.5", "a number in (0, 1]"),
        ("FEDMQ_ROUND_DEADLINE_S", "-1", "a number > 0"),
        ("FEDMQ_LOSSLESS", "gzip", "one of auto, none, zstd"),
        ("FEDMQ_LOG_JSON", "maybe", "1, true, yes, on, 0, false, no, off"),
        ("FEDMQ_METRICS_ADDRESS", "localhost", "HOST:PORT"),
    ],
)
def test_invalid_env_value_names_key_value_allowed(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve(["coordinator", "--task", "digits"], {"FEDMQ_ROUNDS": "3", name: value})

    message = str(error.value)
    assert f"env {name}" in message
    assert repr(value) in message
    assert expected in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("rounds = true", "must be a number or a string"),
        ("rounds = 2.5", "an integer >= 1"),
        ("rounds = [1, 2]", "must be a number or a string"),
        ('lossless = "gzip"', "one of auto, none, zstd"),
        ("codec = 8", "must be a string"),
        ('log-json = "yes"', "must be true or false"),
    ],
)
def test_invalid_file_value_names_key_value_allowed(tmp_path: Path, line: str, expected: str) -> None:
    rounds = "" if line.startswith("rounds") else "rounds = 1\n"
    config = write_toml(tmp_path, f'[coordinator]\ntask = "digits"\n{rounds}{line}\n')

    with pytest.raises(ConfigError) as error:
        resolve(["coordinator", "--config", str(config)])

    message = str(error.value)
    assert f"file {config} [coordinator]" in message
    assert expected in message


def test_unknown_file_key_suggests_option(tmp_path: Path) -> None:
    config = write_toml(tmp_path, '[coordinator]\ntask = "digits"\nrounds = 2\nround-deadline = 5\n')

    with pytest.raises(ConfigError) as error:
        resolve(["coordinator", "--config", str(config)])

    assert "unknown key 'round-deadline'" in str(error.value)
    assert "round-deadline-s" in str(error.value)


def test_unknown_file_table_rejected(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "[coordinater]\nrounds = 2\n")

    with pytest.raises(ConfigError) as error:
        resolve(["worker", "--task", "digits", "--config", str(config)])

    assert "unknown table [coordinater]" in str(error.value)
    assert "[coordinator]" in str(error.value)


def test_duplicate_file_key_rejected(tmp_path: Path) -> None:
    config = write_toml(tmp_path, '[coordinator]\ntask = "digits"\nrounds = 2\nrun-id = "a"\nrun_id = "b"\n')

    with pytest.raises(ConfigError, match="sets 'run_id' twice"):
        resolve(["coordinator", "--config", str(config)])


def test_invalid_toml_rejected(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "[coordinator\nrounds = 2\n")

    with pytest.raises(ConfigError, match="is not valid TOML"):
        resolve(["coordinator", *REQUIRED, "--config", str(config)])


def test_missing_config_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        resolve(["coordinator", *REQUIRED], {"FEDMQ_CONFIG": str(tmp_path / "absent.toml")})


def test_invalid_flag_exits_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as error:
        resolve(["coordinator", "--task", "digits", "--rounds", "0"])

    assert error.value.code == 2
    assert "--rounds: must be an integer >= 1, but got '0'" in capsys.readouterr().err


def test_main_returns_config_exit_code(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FEDMQ_ROUNDS", "many")

    code = main(["coordinator", "--task", "digits"])

    assert code == 2
    assert "env FEDMQ_ROUNDS: --rounds must be an integer >= 1, but got 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["coordinator", "worker", "demo", "status"])
def test_every_option_documents_default(command: str) -> None:
    parser = build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    undocumented = []
    for parser_to_check in (parser, subparsers.choices[command]):
        for action in parser_to_check._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            if "default" not in text and "required" not in text:
                undocumented.append(f"{action.option_strings[0]}: {text!r}")

    assert undocumented == []


# Range types


def test_integer_bounds() -> None:
    parse = integer(minimum=1, maximum=3)

    assert parse("2") == 2
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be an integer in \[1, 3\], but got '4'"):
        parse("4")


def test_number_exclusive_bounds() -> None:
    parse = number(minimum=0, maximum=1, max_exclusive=True)

    assert parse("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 1\)"):
        parse("1")
    with pytest.raises(argparse.ArgumentTypeError):
        parse("nan")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", ""), ("0", ""), ("127.0.0.1:9464", "127.0.0.1:9464"), ("[::1]:0", "[::1]:0"), ("localhost:80", "localhost:80")],
)
def test_address_accepts(text: str, expected: str) -> None:
    assert address(text) == expected


@pytest.mark.parametrize("text", ["9464", "127.0.0.1", "127.0.0.1:70000", "::1:9464", "[nothost]:1", ":9464"])
def test_address_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="HOST:PORT"):
        address(text)


# Redaction and config show


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("broker_url", "amqp://fedmq:hunter2@broker:5671/%2F", f"amqp://fedmq:{REDACTED}@broker:5671/%2F"),
        ("management_url", "https://admin:s3cr%40t@mq.example:15671/", f"https://admin:{REDACTED}@mq.example:15671/"),
        ("broker_url", "amqp://broker:5672/", "amqp://broker:5672/"),
        ("db_password", "plain", REDACTED),
        ("client_secret", "abc", REDACTED),
        ("tls_key_file", "/etc/fedmq/key.pem", REDACTED),
        ("rounds", 5, 5),
        ("run_id", None, None),
    ],
)
def test_redact_value(name: str, value: object, expected: object) -> None:
    assert redact_value(name, value) == expected


def test_redact_nested_settings() -> None:
    settings = {"broker": {"url": "amqp://u:pw@h/%2F", "api_token": "t"}, "rounds": 3}

    assert redact_value("settings", settings) == {"broker": {"url": f"amqp://u:{REDACTED}@h/%2F", "api_token": REDACTED}, "rounds": 3}


def test_redact_url_keeps_user_without_password() -> None:
    assert redact_url_password("amqp://guest@host/") == "amqp://guest@host/"


def test_config_show_redacts_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_toml(tmp_path, '[coordinator]\nbroker-url = "amqp://fedmq:from-file-pw@broker:5672/%2F"\nrounds = 4\n')
    monkeypatch.setenv("FEDMQ_CONFIG", str(config))

    code = main(["config", "show", "coordinator", "--task", "digits"])

    out = capsys.readouterr().out
    assert code == 0
    assert "from-file-pw" not in out
    assert f"amqp://fedmq:{REDACTED}@broker:5672/%2F" in out
    assert f"file {config} [coordinator] broker-url" in out
    assert "flag --task" in out


def test_config_show_redacts_env_and_flag_urls(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FEDMQ_BROKER_URL", "amqp://w:env-pw@broker:5672/%2F")

    code = main(["config", "show", "--json", "status", "--management-url", "http://admin:flag-pw@127.0.0.1:15672/"])

    out = capsys.readouterr().out
    assert code == 0
    assert "env-pw" not in out
    assert "flag-pw" not in out
    shown = json.loads(out)
    assert shown["broker_url"] == {"value": f"amqp://w:{REDACTED}@broker:5672/%2F", "source": "env FEDMQ_BROKER_URL", "missing": False}
    assert shown["management_url"]["value"] == f"http://admin:{REDACTED}@127.0.0.1:15672/"


def test_config_show_missing_required_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["config", "show", "worker"])

    captured = capsys.readouterr()
    assert code == 2
    assert "<required, not set>" in captured.out
    assert "--task is required" in captured.err


def test_settings_json_lists_every_option() -> None:
    resolved = resolve(["worker", "--task", "digits"])

    shown = settings_json(resolved)

    assert set(shown) == set(resolved.settings)
    assert shown["task"] == {"value": "digits", "source": "flag --task", "missing": False}
    assert shown["metrics_address"]["value"] == ""


def test_repeatable_option_from_each_source(tmp_path: Path) -> None:
    config = write_toml(tmp_path, '[coordinator]\nstrategy-option = ["mu=1", "beta=2"]\n')

    from_flags = resolve(["coordinator", *REQUIRED, "--strategy-option", "a=1", "--strategy-option", "b=2"])
    from_env = resolve(["coordinator", *REQUIRED], {"FEDMQ_STRATEGY_OPTION": "c=3 d=4"})
    from_file = resolve(["coordinator", *REQUIRED, "--config", str(config)])
    unset = resolve(["coordinator", *REQUIRED])

    assert from_flags.namespace.strategy_option == ["a=1", "b=2"]
    assert from_env.namespace.strategy_option == ["c=3", "d=4"]
    assert from_file.namespace.strategy_option == ["mu=1", "beta=2"]
    assert unset.namespace.strategy_option == []
    assert unset.source("strategy_option") == "default"
