#!/usr/bin/env bash
# Create .venv at the repo root with Python >= 3.12 and install pplalign with its dev tools.
# Idempotent: reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    local candidates=()
    [[ -n "${PYTHON:-}" ]] && candidates+=("$PYTHON")
    candidates+=(python3.13 python3.12 python3)
    if command -v pyenv >/dev/null 2>&1; then
        local root; root=$(pyenv root)
        for v in "$root"/versions/3.1[2-9]*; do [[ -x "$v/bin/python" ]] && candidates+=("$v/bin/python"); done
    fi
    for v in "$HOME"/.pyenv/versions/3.1[2-9]* /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
        [[ -x "$v/bin/python" ]] && candidates+=("$v/bin/python")
        [[ -x "$v" && ! -d "$v" ]] && candidates+=("$v")
    done
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 || [[ -x "$c" ]]; then
            # pyenv shims fail for versions not selected; ask the interpreter itself.
            if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
                echo "$c"; return 0
            fi
        fi
    done
    for v in 3.13.0 3.12.1; do
        if PYENV_VERSION=$v python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
            PYENV_VERSION=$v python3 -c 'import sys; print(sys.executable)'; return 0
        fi
    done
    return 1
}

if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
    py=$(find_python) || { echo "setup: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
    echo "setup: creating .venv with $py"
    rm -rf .venv
    "$py" -m venv .venv
fi

stamp=.venv/.pplalign-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || "$(cat $stamp)" != "$want" ]]; then
    echo "setup: installing pplalign and dependencies into .venv (a few minutes the first time)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$want" > $stamp
fi
