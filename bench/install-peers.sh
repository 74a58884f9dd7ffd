#!/usr/bin/env bash
# Install the peer SOCKS5 proxies the benchmark compares socks5d with.
# Each one is optional: bench/run.py skips (and notes) any that is missing.
# Needs root for apt-get (Debian: microsocks, dante-server); pproxy comes from PyPI.
set -uo pipefail

if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null || echo "install-peers: apt-get update failed"
  apt-get install -y -qq microsocks dante-server </dev/null \
    || echo "install-peers: could not install microsocks/dante-server; they will be skipped"
  # The Debian package starts danted as a service on port 1080; the benchmark runs its own.
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now danted >/dev/null 2>&1 || true
  fi
else
  echo "install-peers: no apt-get; microsocks and dante will be skipped"
fi

python3 -m pip install -q pproxy || echo "install-peers: could not install pproxy; it will be skipped"
