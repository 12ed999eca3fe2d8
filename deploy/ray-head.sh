#!/bin/sh
# Entry point of the Ray head in docker-compose (and of tests/deploy's local stack): start a Ray head, deploy a
# serve config with `serve deploy` (as KubeRay does with serveConfigV2), stay in the foreground until stopped.
#
#   ray-head.sh [options] CONFIG [-- extra `ray start` flags]
#
# CONFIG: cpu | gpu | gpu-single (deploy/serve_config.<name>.yaml beside this script) or a path to a serve config.
# The config is deployed as written except for the proxies' addresses, which the options set: in a container the
# HTTP proxy must listen on the container's interface (0.0.0.0), not the loopback the local configs name.
# Ray's token authentication follows RAY_AUTH_MODE / RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) from the environment.
set -eu

http_host=0.0.0.0 http_port=8000 grpc_port=9000 gcs_port=6379 client_port=10001 dashboard_port=8265
metrics_port=8080 agent_port=52365 node_ip=""
usage() { sed -n '2,10p' "$0" >&2; echo "options: --http-host H --http-port P --grpc-port P --gcs-port P" \
  "--client-port P --dashboard-port P --metrics-port P --agent-port P --node-ip IP" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --http-host) http_host=$2; shift 2 ;;
    --http-port) http_port=$2; shift 2 ;;
    --grpc-port) grpc_port=$2; shift 2 ;;
    --gcs-port) gcs_port=$2; shift 2 ;;
    --client-port) client_port=$2; shift 2 ;;
    --dashboard-port) dashboard_port=$2; shift 2 ;;
    --metrics-port) metrics_port=$2; shift 2 ;;
    --agent-port) agent_port=$2; shift 2 ;;
    --node-ip) node_ip=$2; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "ray-head: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || usage
config=$1; shift
[ "${1:-}" = "--" ] && shift
case "$config" in
  */*) source_config=$config ;;
  *) source_config="$(dirname "$0")/serve_config.$config.yaml" ;;
esac
[ -f "$source_config" ] || { echo "ray-head: no serve config $source_config" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/saev-head.XXXXXX")
deployed="$work/serve_config.yaml"
python - "$source_config" "$deployed" "$http_host" "$http_port" "$grpc_port" <<'PY'
import sys

import yaml

source, target, host, http_port, grpc_port = sys.argv[1:]
with open(source) as f:
    config = yaml.safe_load(f)
config.setdefault("http_options", {}).update(host=host, port=int(http_port))
config.setdefault("grpc_options", {})["port"] = int(grpc_port)
with open(target, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
PY

set -- ray start --head --block --port="$gcs_port" --ray-client-server-port="$client_port" \
  --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" --dashboard-agent-listen-port="$agent_port" \
  --metrics-export-port="$metrics_port" --disable-usage-stats ${node_ip:+--node-ip-address="$node_ip"} "$@"
"$@" &
ray_pid=$!
# Stop exactly the Ray this script started: SIGTERM to `ray start --block` stops its processes (never `ray stop`,
# which stops every Ray on the machine).
stop() {
  kill -TERM "$ray_pid" 2>/dev/null || true
  wait "$ray_pid" 2>/dev/null || true
  rm -rf "$work"
  exit "${1:-0}"
}
trap 'stop 0' TERM INT

# `ray start --block` returns only when Ray stops; wait for its dashboard (what `serve deploy` talks to).
dashboard="http://127.0.0.1:$dashboard_port"
until python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/api/gcs_healthz', timeout=2)" \
    "$dashboard" 2>/dev/null; do
  kill -0 "$ray_pid" 2>/dev/null || { echo "ray-head: ray start exited" >&2; rm -rf "$work"; exit 1; }
  sleep 1
done
serve deploy --address "$dashboard" "$deployed" || { echo "ray-head: serve deploy failed" >&2; stop 1; }
echo "ray-head: deployed $source_config (HTTP $http_host:$http_port, gRPC $grpc_port, metrics $metrics_port)"
wait "$ray_pid"
