# Shared by up.sh, down.sh, on, node and ray-up.sh for the simulated multi-node cluster (sourced).
#
# A node is a network namespace (${PREFIX}-nodeK, address $SUBNET.K/24 on eth0, bridged in the
# ${PREFIX}-hub namespace, no default route) plus a PID + UTS + mount namespace whose PID 1 is
# nodeinit.py (hostname nodeK, its own /proc and /sys, a private /etc/hosts naming node1..nodeN).
# Settings live in $DIR/nodes.env once up.sh has run, so the other scripts need only the state dir.

LOCAL=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${STORYMM_SLURM_DIR:-/tmp/storymm-nodes}
if [[ -f $DIR/nodes.env ]]; then
    # shellcheck disable=SC1091
    . "$DIR/nodes.env"
else
    PREFIX=${STORYMM_NODES_PREFIX:-smm}
    SUBNET=${STORYMM_NODES_SUBNET:-10.77.0}
    NODES=${NODES:-0}
fi
PATH=$PATH:/usr/sbin:/sbin

netns() { echo "$PREFIX-$1"; }                       # netns name of node1.. or hub
node_ip() { echo "$SUBNET.${1#node}"; }
node_names() { local k; for ((k = 1; k <= NODES; k++)); do echo "node$k"; done; }

# init_pid NODE: host PID of the node's init, only if that process is still ours (recorded by us in
# the root namespace; checked against its command line so a recycled PID is never signalled).
init_pid() {
    local file=$DIR/nodes/$1.init pid
    [[ -f $file ]] || return 1
    pid=$(cat "$file")
    [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "nodeinit.py $DIR $1" || return 1
    echo "$pid"
}

# start_node NODE: a fresh init in the node's (existing) network namespace; prints its host PID.
start_node() {
    local n=$1 up init
    mkdir -p "$DIR/nodes"
    # unshare forks the init (--fork is implied by --pid with --kill-child); the init is its child.
    # In the sh -c script: no apostrophes (it is single-quoted).
    nsenter --net="/run/netns/$(netns "$n")" \
        unshare --uts --pid --mount --propagation private --mount-proc --kill-child \
        sh -c 'set -e; hostname "$1"; mount --bind "$2/hosts" /etc/hosts
               cg=$2/nodes/.cg-$1; mkdir -p $cg; mount --rbind /sys/fs/cgroup $cg; mount -t sysfs sysfs /sys
               mount --move $cg /sys/fs/cgroup; rmdir $cg
               exec /usr/bin/python3 "$3/nodeinit.py" "$2" "$1"' sh "$n" "$DIR" "$LOCAL" \
        >"$DIR/nodes/$n.log" 2>&1 </dev/null &
    up=$!
    for _ in $(seq 100); do
        init=$(awk '{print $1}' "/proc/$up/task/$up/children" 2>/dev/null)
        [[ -n $init ]] && grep -q "up$" "$DIR/nodes/$n.log" 2>/dev/null && break
        sleep 0.05
    done
    [[ -n $init ]] || { echo "nodes.sh: $n did not start; see $DIR/nodes/$n.log" >&2; return 1; }
    echo "$init" >"$DIR/nodes/$n.init"
    echo "$init"
}

# stop_node NODE [KILL]: TERM the init (clean shutdown) and wait, or KILL it at once (power cut).
stop_node() {
    local n=$1 pid
    pid=$(init_pid "$n") || { rm -f "$DIR/nodes/$n.init"; return 0; }
    if [[ ${2:-} == KILL ]]; then
        kill -KILL "$pid" 2>/dev/null
    else
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    fi
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$DIR/nodes/$n.init"
}
