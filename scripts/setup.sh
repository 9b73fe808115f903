#!/usr/bin/env bash
# Installs everything consolegate needs on a Debian 12 machine (run as root; idempotent):
# Debian packages (Xvnc, Chromium, X tools, Node.js, curl and git, systemd for systemd-analyze; systemd is
# not booted), a Python venv in .venv with the project
# and its test/bench extras (versions pinned by constraints.txt), and noVNC from static/package-lock.json into static/node_modules.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(curl git tigervnc-standalone-server tigervnc-tools xterm xclip x11-apps x11-utils x11-xserver-utils xdotool chromium
              openssl python3-venv qemu-system-x86 qemu-utils postgresql nginx haproxy systemd
              libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu libvirt-dev pkg-config)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(nodejs npm)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,broker,bench,libvirt]'

(cd static && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
echo "setup: ready (.venv, static/node_modules)"
