#!/usr/bin/env bash
# The demo: installs what it needs, then starts a VNC desktop, the proxy (and broker) and prints a
# console URL. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
