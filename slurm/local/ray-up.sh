#!/usr/bin/env bash
# A Ray cluster on the simulated nodes of slurm/local/up.sh --nodes N: the head on node1 (GCS
# $SUBNET.1:6379, dashboard and job server http://$SUBNET.1:8265), one `ray start --address` per
# other node. Stopped with the nodes (down.sh, or `node kill|stop`): never `ray stop`, which kills
# Ray processes by name machine-wide.
#   slurm/local/ray-up.sh                  # head + every other node
#   slurm/local/ray-up.sh --join node2     # (re)join one node, e.g. after `node start node2`
#   slurm/local/on node1 ray job submit --address http://$SUBNET.1:8265 --working-dir . -- python jobs/train.py ...
# Environment: STORYMM_RAY_CPUS (logical CPUs per node, default 1), RAY_health_check_* (defaults
# below: a lost node is declared dead after ~5 s instead of ~13 s), RAY_AUTH_MODE (default disabled:
# the cluster is reachable from inside the nodes only).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/nodes.sh"
[[ -f $DIR/nodes.env ]] || { echo "ray-up.sh: no simulated nodes under $DIR (up.sh --nodes N first)" >&2; exit 1; }
REPO=$(cd "$LOCAL/../.." && pwd)
BIN=${STORYMM_RAY_BIN:-$REPO/.venv/bin}
[[ -x $BIN/ray ]] || { echo "ray-up.sh: $BIN/ray not found (set STORYMM_RAY_BIN)" >&2; exit 1; }
HEAD=$(node_ip node1)
export PATH=$BIN:$PATH                      # `python` in job entrypoints = the venv's (jobs run with the head's PATH)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
export RAY_TMPDIR=$DIR/ray/tmp
export RAY_health_check_period_ms=${RAY_health_check_period_ms:-1000}
export RAY_health_check_timeout_ms=${RAY_health_check_timeout_ms:-1000}
export RAY_health_check_failure_threshold=${RAY_health_check_failure_threshold:-3}
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER      # =0 makes `ray start --address` refuse to join, even on Linux
mkdir -p "$RAY_TMPDIR/ray"
# Ray's worker ports stay clear of SeaweedFS's gRPC ports (1xxxx) on node1.
COMMON=(--num-cpus="${STORYMM_RAY_CPUS:-1}" --num-gpus=0 --object-store-memory=100000000 --disable-usage-stats
        --min-worker-port=21000 --max-worker-port=21999)

join() {
    local n=$1
    rm -rf "$DIR/ray/$n"
    "$LOCAL/on" "$n" "$BIN/ray" start --address="$HEAD:6379" --node-ip-address="$(node_ip "$n")" \
        --temp-dir="$DIR/ray/$n" "${COMMON[@]}" >>"$DIR/ray/$n.out" 2>&1 </dev/null \
        || { tail -n 30 "$DIR/ray/$n.out" >&2; return 1; }
}

alive_nodes() {
    "$LOCAL/on" node1 "$BIN/python" -c "
import ray
ray.init(address='$HEAD:6379', logging_level='ERROR', log_to_driver=False)
print(sum(1 for n in ray.nodes() if n['Alive']))" 2>/dev/null | tail -n 1
}

if [[ ${1:-} == --join ]]; then
    join "$2"
    echo "ray-up.sh: $2 joined the Ray cluster at $HEAD:6379" >&2
    exit 0
fi
[[ $# -eq 0 ]] || { echo "usage: ray-up.sh [--join NODE]" >&2; exit 2; }
rm -rf "$DIR/ray/node1"
"$LOCAL/on" node1 "$BIN/ray" start --head --node-ip-address="$HEAD" --port=6379 --dashboard-host=0.0.0.0 \
    --dashboard-port=8265 --temp-dir="$DIR/ray/node1" "${COMMON[@]}" >>"$DIR/ray/node1.out" 2>&1 </dev/null \
    || { tail -n 30 "$DIR/ray/node1.out" >&2; exit 1; }
for n in $(node_names); do
    [[ $n == node1 ]] || join "$n"
done
for _ in $(seq 60); do   # the head's view lags the joins by a moment
    [[ $(alive_nodes) == "$NODES" ]] && break
    sleep 1
done
[[ $(alive_nodes) == "$NODES" ]] || { echo "ray-up.sh: not all $NODES nodes alive in Ray" >&2; exit 1; }
echo "ray-up.sh: Ray on $NODES nodes; head $HEAD:6379, jobs http://$HEAD:8265" >&2
echo "export RAY_ADDRESS=http://$HEAD:8265"
