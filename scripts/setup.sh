#!/usr/bin/env bash
# Install what fedmq needs on Debian or Ubuntu. rabbitmq-server comes from apt-get: the
# demo and the tests start private nodes from it and never use the system service.
# A Python 3.11+ virtual environment in .venv gets torch 2.13.0 (CPU), then fedmq with
# its test extras.
#
# Safe to run again: each step checks whether it is done, and the pip steps are skipped
# while pyproject.toml and the interpreter match the stamp of the last install.
#
# Environment: PYTHON=/path/to/python3.x picks the interpreter for a new .venv.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv=".venv"
stamp="$venv/.fedmq-setup-stamp"
torch_version="2.13.0"
torch_cpu_index="https://download.pytorch.org/whl/cpu"

log() {
    echo "setup: $*" >&2
}

run() {
    echo "+ $*" >&2
    "$@"
}

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        run "$@"
    elif command -v sudo >/dev/null 2>&1; then
        run sudo "$@"
    else
        log "need root for: $*, but this is not root and sudo is not installed"
        exit 1
    fi
}

apt_updated=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt-get is not available; install these packages with your package manager: $*"
        exit 1
    fi
    if [ "$apt_updated" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# RabbitMQ. Debian's /usr/sbin/rabbitmq-server is a wrapper that switches to the
# rabbitmq user, so the check looks for the real script that fedmq runs.
rabbitmq_installed() {
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && return 0
    local found
    found="$(command -v rabbitmq-server 2>/dev/null)" || return 1
    [ -e "$(dirname "$found")/rabbitmq-env" ]
}

ensure_rabbitmq() {
    if rabbitmq_installed; then
        log "rabbitmq-server is installed"
        return
    fi
    log "rabbitmq-server is missing; installing it with apt-get"
    apt_install rabbitmq-server
    if ! rabbitmq_installed; then
        log "apt-get finished, but /usr/lib/rabbitmq/bin/rabbitmq-server is still missing"
        exit 1
    fi
    # fedmq starts private nodes on 127.0.0.1 and never uses the system service, which
    # apt starts on all interfaces where systemd runs.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        log "disabling the rabbitmq-server system service that apt-get just started; fedmq does not use it"
        as_root systemctl disable --now rabbitmq-server || log "could not disable the rabbitmq-server service"
    fi
}

# Chromium: the report tests (tests/ops) open report.html in headless Chromium.
ensure_chromium() {
    if command -v chromium >/dev/null 2>&1; then
        log "chromium is installed"
        return
    fi
    log "chromium is missing; installing it with apt-get for the report tests"
    apt_install chromium
}

python_is_supported() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

# Prints the first Python of at least 3.11, trying 3.11 first because the local torch
# wheel is built for it.
find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && python_is_supported "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

ensure_venv() {
    if [ -x "$venv/bin/python" ] && python_is_supported "$venv/bin/python"; then
        log "$venv exists ($("$venv/bin/python" --version 2>&1))"
        return
    fi
    if [ -e "$venv" ]; then
        log "$venv exists but its python does not run or is older than 3.11; recreating it"
        run rm -rf "$venv"
    fi

    local python
    if ! python="$(find_python)"; then
        log "no Python 3.11 or newer found; installing python3 with apt-get"
        apt_install python3 python3-venv
        python="$(find_python)" || {
            log "no Python 3.11 or newer after apt-get; install python3.11 and rerun, or set PYTHON=/path/to/python3.11"
            exit 1
        }
    fi

    # Debian and Ubuntu ship venv's ensurepip in a separate package.
    if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        local minor
        minor="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        log "$python lacks ensurepip; installing python$minor-venv with apt-get"
        apt_install "python$minor-venv"
    fi
    run "$python" -m venv "$venv"
}

torch_installed() {
    "$venv/bin/python" -c "
import sys, torch
sys.exit(0 if torch.__version__.split('+')[0] == '$torch_version' else 1)
" >/dev/null 2>&1
}

install_packages() {
    local wanted
    wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) $("$venv/bin/python" --version 2>&1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && torch_installed \
        && "$venv/bin/python" -c 'import fedmq, pytest' >/dev/null 2>&1; then
        log "Python packages are up to date with pyproject.toml"
        return
    fi

    run "$venv/bin/python" -m pip install --upgrade pip

    # torch first, pinned, so that no later requirement pulls in another build.
    if torch_installed; then
        log "torch $torch_version is installed"
    elif ! run "$venv/bin/python" -m pip install "torch==$torch_version"; then
        log "pip install torch==$torch_version failed; retrying from the PyTorch CPU index"
        run "$venv/bin/python" -m pip install "torch==$torch_version" --index-url "$torch_cpu_index"
    fi

    run "$venv/bin/python" -m pip install -e '.[test]'
    echo "$wanted" >"$stamp"
}

ensure_rabbitmq
ensure_chromium
ensure_venv
install_packages
log "done: run 'make demo' or 'make test'"
