#!/usr/bin/env bash
# Run the test suite. As root, inside a network namespace that has only loopback, so no test can send traffic
# anywhere else (Ray looks up its node address toward a public address; SeaweedFS and Ray bind all interfaces).
# Extra arguments go to pytest: scripts/run-tests.sh -k storage -x
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

# Debian packages the tests need (a browser for the web UI tests), installed when we may.
need_pkgs=()
if [ -d services/gateway/static ] && ! command -v chromium >/dev/null 2>&1; then need_pkgs+=(chromium); fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages: ${need_pkgs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "missing Debian packages for the browser tests: ${need_pkgs[*]} (run as root or apt-get install them);" \
         "those tests will fail" >&2
  fi
fi

export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONHASHSEED=0
cmd=("$PY" -m pytest "$@")
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then
  echo "running the tests in a loopback-only network namespace"
  exec unshare -n bash -c 'ip link set lo up && exec "$@"' bash "${cmd[@]}"
fi
echo "note: not root (or unshare unavailable): tests bind loopback only, but run in the host network namespace" >&2
exec "${cmd[@]}"
