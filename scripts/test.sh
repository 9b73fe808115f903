#!/usr/bin/env bash
# The whole test suite: installs what it needs, lints and type-checks, then runs pytest (real Xvnc, real Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # strict, on console_proxy/ and broker/: the [mypy] section of setup.cfg
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
