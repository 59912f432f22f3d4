"""Settings from command-line flags, ``FEDMQ_*`` environment variables and a TOML file.

``fedmq.cli.build_parser()`` declares every option once. This module reads those
declarations, so each option of a configurable command (coordinator, worker, demo,
status) and of the top-level parser is also accepted from:

- the environment, as ``FEDMQ_<OPTION>`` with the option's name in capitals and
  underscores (``--round-deadline-s`` is ``FEDMQ_ROUND_DEADLINE_S``);
- a TOML file named by ``--config FILE`` or ``FEDMQ_CONFIG``, in the table named
  after the command (``[coordinator]``, ``[worker]``, ...), with keys spelled with
  dashes or underscores. Top-level options such as ``log-level`` may also stand
  outside any table.

Precedence, highest first: flag, environment, file, the declared default. Values from
the environment and the file go through the option's own ``type`` and ``choices``,
so they are validated exactly like flags. An invalid value raises ConfigError naming
the option, where the value came from, the value and what is allowed.

The ``integer``, ``number`` and ``address`` factories build argparse ``type``
callables that also check ranges, so a range is declared once, next to its option.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError

ENV_PREFIX = "FEDMQ_"
CONFIG_OPTION = "config"
CONFIGURABLE_COMMANDS = ("coordinator", "worker", "demo", "status")
SOURCE_DEFAULT = "default"
REDACTED = "***"

# Options whose names contain one of these words are secrets, so `config show` and
# the run directory's settings.json print their values as "***".
SECRET_NAME_PATTERN = re.compile(r"password|secret|key|token", re.IGNORECASE)

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
_FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
_SKIPPED_ACTIONS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
_ACCUMULATING_ACTIONS = (argparse._AppendAction, argparse._AppendConstAction, argparse._ExtendAction, argparse._CountAction)


class _Unset:
    """Marks an option that the command line did not set."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()


@dataclass(frozen=True)
class Setting:
    """One option's effective value and where it came from.

    ``source`` is ``default``, ``flag --name``, ``env FEDMQ_NAME`` or
    ``file PATH [table] key``. ``missing`` marks a required option that no source set.
    """

    name: str
    value: Any
    source: str
    flag: str
    help: str
    missing: bool = False


@dataclass
class ResolvedSettings:
    """The parsed command line merged with the environment and the config file."""

    command: str | None
    namespace: argparse.Namespace
    settings: dict[str, Setting]
    config_path: Path | None

    def source(self, name: str) -> str:
        return self.settings[name].source

    @property
    def missing(self) -> list[Setting]:
        return [setting for setting in self.settings.values() if setting.missing]


# Argparse types with range checks

def integer(*, minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """Build an argparse ``type`` that parses an integer within [minimum, maximum]."""
    expected = _range_text("an integer", minimum, maximum)

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, but got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {expected}, but got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def number(
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
) -> Callable[[str], float]:
    """Build an argparse ``type`` that parses a finite float within the given bounds.

    Each bound is inclusive unless its ``*_exclusive`` flag is set.
    """
    expected = _range_text("a number", minimum, maximum, min_exclusive=min_exclusive, max_exclusive=max_exclusive)

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, but got {text!r}") from None
        too_small = minimum is not None and (value <= minimum if min_exclusive else value < minimum)
        too_large = maximum is not None and (value >= maximum if max_exclusive else value > maximum)
        if not math.isfinite(value) or too_small or too_large:
            raise argparse.ArgumentTypeError(f"must be {expected}, but got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def address(text: str) -> str:
    """Parse a listen address ``HOST:PORT``, or ``[IPV6]:PORT`` for IPv6.

    Returns the address unchanged, or ``""`` for ``""`` and ``"0"``, which disable the
    listener. Port 0 lets the operating system pick a free port.
    """
    text = text.strip()
    if text in ("", "0"):
        return ""
    try:
        split_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def split_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPV6]:PORT`` into host and port. Raises ValueError when invalid."""
    expected = "HOST:PORT or [IPV6]:PORT with a port in [0, 65535], or '' or '0' to disable"
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"must be {expected}, but got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"must be {expected}, but got {text!r}") from None
    elif ":" in host:
        raise ValueError(f"must be {expected}, but got {text!r}: write an IPv6 host in brackets")
    return host, int(port_text)


def _range_text(
    kind: str, minimum: float | None, maximum: float | None, *, min_exclusive: bool = False, max_exclusive: bool = False
) -> str:
    if minimum is not None and maximum is not None:
        left = "(" if min_exclusive else "["
        right = ")" if max_exclusive else "]"
        return f"{kind} in {left}{minimum:g}, {maximum:g}{right}"
    if minimum is not None:
        return f"{kind} {'>' if min_exclusive else '>='} {minimum:g}"
    if maximum is not None:
        return f"{kind} {'<' if max_exclusive else '<='} {maximum:g}"
    return kind


# Resolution

def resolve_settings(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    *,
    allow_missing: bool = False,
) -> ResolvedSettings:
    """Parse ``argv`` with ``parser`` and fill the options it leaves unset from the environment and the config file.

    ``parser`` must be a fresh parser from ``build_parser()``, because its actions are
    changed while parsing. Flags are checked by argparse, which prints usage and exits
    with status 2 on an invalid flag. Raises ConfigError for an invalid value from the
    environment or the file, an unknown key or table in the file, an unreadable file,
    or a required option that no source set (unless ``allow_missing``).
    """
    environ = os.environ if environ is None else environ
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        # argparse prints the help of the declared (not relaxed) parser and exits.
        parser.parse_args(argv)

    subparsers = _subparsers_action(parser)
    declared = _relax(parser)
    for subparser in (subparsers.choices.values() if subparsers is not None else ()):
        declared.update(_relax(subparser))
    namespace = parser.parse_args(argv)

    command: str | None = getattr(namespace, subparsers.dest, None) if subparsers is not None else None
    command_parser = subparsers.choices[command] if subparsers is not None and command is not None else None
    configurable = command in CONFIGURABLE_COMMANDS and command_parser is not None
    use_environment = {id(action) for action in _options(parser)}
    if configurable:
        assert command_parser is not None
        use_environment |= {id(action) for action in _options(command_parser)}

    # The config file: a flag wins over FEDMQ_CONFIG.
    config_env = ENV_PREFIX + CONFIG_OPTION.upper()
    config_path: Path | None = None
    config_source = SOURCE_DEFAULT
    document: dict[str, Any] = {}
    if configurable:
        flag_value = getattr(namespace, CONFIG_OPTION, UNSET)
        if isinstance(flag_value, (str, Path)):
            config_path, config_source = Path(flag_value), f"flag --{CONFIG_OPTION}"
        elif environ.get(config_env):
            config_path, config_source = Path(environ[config_env]), f"env {config_env}"
        if config_path is not None:
            document = _load_toml(config_path)
    file_values = _file_values(document, config_path, parser, command if configurable else None, command_parser)

    # Each option: flag, environment, file, default.
    settings: dict[str, Setting] = {}
    actions = _options(parser) + (_options(command_parser) if command_parser is not None else [])
    for action in actions:
        original_default, required = declared[id(action)]
        flag = _flag_name(action)
        value = getattr(namespace, action.dest, UNSET)
        env_name = ENV_PREFIX + action.dest.upper()
        missing = False
        if action.dest == CONFIG_OPTION:
            value, source = config_path, config_source
        elif not _is_unset(action, value):
            source = f"flag {flag}"
        elif id(action) in use_environment and env_name in environ:
            source = f"env {env_name}"
            value = _from_text(action, environ[env_name], source)
        elif action.dest in file_values:
            source, raw = file_values[action.dest]
            value = _from_toml(action, raw, source)
        else:
            source = SOURCE_DEFAULT
            value = original_default
            if isinstance(value, str) and callable(action.type) and not isinstance(action, _FLAG_ACTIONS):
                value = action.type(value)
            if required:
                missing = True
                if not allow_missing:
                    raise ConfigError(_missing_message(action, command, env_name))
        setattr(namespace, action.dest, value)
        settings[action.dest] = Setting(action.dest, value, source, flag, action.help or "", missing)

    return ResolvedSettings(command, namespace, settings, config_path)


def _subparsers_action(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any] | None:
    # argparse has no public accessor for its subcommands or actions, so this reads
    # the private _actions list.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions
        if action.option_strings and not isinstance(action, _SKIPPED_ACTIONS) and action.dest != argparse.SUPPRESS
    ]


def _relax(parser: argparse.ArgumentParser) -> dict[int, tuple[Any, bool]]:
    """Make every option optional and unset by default. Return the declared (default, required) by action id.

    Actions that add to their value (append, extend, count) start from None instead
    of UNSET, because argparse copies and extends the default.
    """
    declared: dict[int, tuple[Any, bool]] = {}
    for action in _options(parser):
        declared[id(action)] = (action.default, action.required)
        action.default = None if isinstance(action, _ACCUMULATING_ACTIONS) else UNSET
        action.required = False
    return declared


def _is_unset(action: argparse.Action, value: Any) -> bool:
    return value is UNSET or (value is None and isinstance(action, _ACCUMULATING_ACTIONS))


def _flag_name(action: argparse.Action) -> str:
    long_flags = [option for option in action.option_strings if option.startswith("--")]
    return long_flags[0] if long_flags else action.option_strings[0]


def _missing_message(action: argparse.Action, command: str | None, env_name: str) -> str:
    key = action.dest.replace("_", "-")
    table = f"[{command}]" if command else "the top level"
    return (
        f"{command or 'fedmq'} option {_flag_name(action)} is required: set it as a flag, "
        f"as {env_name}, or as {key} in {table} of the --config file"
    )


# The TOML file

def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; check --config or FEDMQ_CONFIG") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _file_values(
    document: dict[str, Any],
    path: Path | None,
    parser: argparse.ArgumentParser,
    command: str | None,
    command_parser: argparse.ArgumentParser | None,
) -> dict[str, tuple[str, Any]]:
    """Map option names to (source text, raw value) from the file's keys.

    Top-level keys set top-level options. The command's table sets the command's
    options and top-level options, and wins over top-level keys. Tables of other
    commands are checked for their name only, because one file serves every command.
    """
    if not document:
        return {}
    root_actions = {action.dest: action for action in _options(parser) if action.dest != CONFIG_OPTION}
    found: dict[str, tuple[str, Any]] = {}

    for key, value in document.items():
        if isinstance(value, dict):
            if key not in CONFIGURABLE_COMMANDS:
                known = ", ".join(f"[{name}]" for name in CONFIGURABLE_COMMANDS)
                raise ConfigError(f"config file {path}: unknown table [{key}]; the known tables are {known}")
            continue
        action = _match_key(key, root_actions, path, "the top level")
        found[action.dest] = (f"file {path} {key}", value)

    if command is None or command_parser is None:
        return found
    command_actions = {action.dest: action for action in _options(command_parser) if action.dest != CONFIG_OPTION}
    allowed = {**root_actions, **command_actions}
    seen: dict[str, str] = {}
    for key, value in document.get(command, {}).items():
        action = _match_key(key, allowed, path, f"[{command}]")
        if action.dest in seen:
            raise ConfigError(f"config file {path}: [{command}] sets {action.dest!r} twice, as {seen[action.dest]!r} and {key!r}")
        seen[action.dest] = key
        found[action.dest] = (f"file {path} [{command}] {key}", value)
    return found


def _match_key(key: str, actions: Mapping[str, argparse.Action], path: Path | None, where: str) -> argparse.Action:
    dest = key.replace("-", "_")
    if dest in actions:
        return actions[dest]
    names = sorted(name.replace("_", "-") for name in actions)
    close = difflib.get_close_matches(key.replace("_", "-"), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; the known keys are {', '.join(names)}"
    raise ConfigError(f"config file {path}: unknown key {key!r} in {where}{hint}")


# Conversion of environment and file values

def _from_text(action: argparse.Action, text: str, source: str) -> Any:
    if isinstance(action, _FLAG_ACTIONS):
        word = text.strip().lower()
        # The value is the option's own boolean, also for a store_false flag.
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ConfigError(f"{source}: {_flag_name(action)} must be one of 1, true, yes, on, 0, false, no, off, but got {text!r}")
    if action.nargs == 0:
        raise ConfigError(f"{source}: {_flag_name(action)} can only be set as a flag")
    if _takes_list(action):
        return [_convert(action, part, source) for part in shlex.split(text)]
    return _convert(action, text, source)


def _from_toml(action: argparse.Action, raw: Any, source: str) -> Any:
    flag = _flag_name(action)
    if isinstance(action, _FLAG_ACTIONS):
        if not isinstance(raw, bool):
            raise ConfigError(f"{source}: {flag} must be true or false, but got {raw!r}")
        return raw
    if action.nargs == 0:
        raise ConfigError(f"{source}: {flag} can only be set as a flag")
    if _takes_list(action):
        if not isinstance(raw, list):
            raise ConfigError(f"{source}: {flag} must be a list, but got {raw!r}")
        return [_from_toml_scalar(action, item, source) for item in raw]
    return _from_toml_scalar(action, raw, source)


def _from_toml_scalar(action: argparse.Action, raw: Any, source: str) -> Any:
    flag = _flag_name(action)
    if isinstance(raw, str):
        return _convert(action, raw, source)
    numeric = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if numeric and action.type not in (None, str, Path):
        return _convert(action, str(raw), source)
    expected = "a string" if action.type in (None, str, Path) else "a number or a string"
    raise ConfigError(f"{source}: {flag} must be {expected}, but got {raw!r}")


def _convert(action: argparse.Action, text: str, source: str) -> Any:
    flag = _flag_name(action)
    value: Any = text
    converter = action.type
    if callable(converter):
        try:
            value = converter(text)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{source}: {flag} {exc}") from None
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {flag} must be {_type_description(converter)}, but got {text!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(choice) for choice in action.choices)
        raise ConfigError(f"{source}: {flag} must be one of {choices}, but got {text!r}")
    return value


def _type_description(converter: Callable[[str], Any]) -> str:
    if converter is int:
        return "an integer"
    if converter is float:
        return "a number"
    return f"a valid {getattr(converter, '__name__', 'value')}"


def _takes_list(action: argparse.Action) -> bool:
    return action.nargs in ("*", "+") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)


# Redaction and display

def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME_PATTERN.search(name))


def redact_url_password(text: str) -> str:
    """Return ``text`` with the password of each ``scheme://user:password@host`` URL in it replaced by ``***``."""
    return re.sub(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*):[^/@\s]*@", rf"\g<head>:{REDACTED}@", text)


def redact_value(name: str, value: Any) -> Any:
    """Return ``value`` with secrets hidden: the whole value for a secret ``name``, else URL passwords inside it."""
    if value is None or value == "":
        return value
    if is_secret_name(name):
        return REDACTED
    if isinstance(value, str):
        return redact_url_password(value)
    if isinstance(value, Mapping):
        return {key: redact_value(str(key), item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(name, item) for item in value]
    return value


def format_settings(resolved: ResolvedSettings) -> str:
    """Render the effective settings as aligned ``name  value  source`` lines, secrets redacted."""
    rows = []
    for setting in resolved.settings.values():
        display_value = "<required, not set>" if setting.missing else _display(redact_value(setting.name, setting.value))
        rows.append((setting.name.replace("_", "-"), display_value, setting.source))
    name_width = max((len(row[0]) for row in rows), default=0)
    value_width = min(max((len(row[1]) for row in rows), default=0), 60)
    config = str(resolved.config_path) if resolved.config_path is not None else "none"
    lines = [f"{resolved.command or 'fedmq'} settings (config file: {config})"]
    for name, display_value, source in rows:
        lines.append(f"  {name:<{name_width}}  {display_value:<{value_width}}  {source}")
    return "\n".join(lines)


def settings_json(resolved: ResolvedSettings) -> dict[str, dict[str, Any]]:
    """Return {name: {value, source}} with secrets redacted, for ``config show --json``."""
    return {
        setting.name: {
            "value": None if setting.missing else _jsonable(redact_value(setting.name, setting.value)),
            "source": setting.source,
            "missing": setting.missing,
        }
        for setting in resolved.settings.values()
    }


def _display(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return repr(value) if not isinstance(value, (int, float, bool)) or value is None else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value
