#!/usr/bin/env bash
# Tear down the simulated nodes of slurm/local/up.sh --nodes N (run by down.sh); safe to repeat
# and after a crash: nodes are stopped through their inits (TERM, then the kernel kills the rest
# of each PID namespace), never by pid files written inside a node nor by process name.
#   STORYMM_SLURM_DIR=DIR slurm/local/down.sh [--purge]     # --purge also deletes DIR
#   STORYMM_NODES_PREFIX=P slurm/local/down.sh               # state dir lost: by namespace prefix
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/nodes.sh"

names=$(node_names)
for path in /run/netns/"$PREFIX"-node*; do   # also nodes whose state was lost
    [[ -e $path ]] && names+=$'\n'${path#/run/netns/"$PREFIX"-}
done
names=$(sort -u <<<"$names" | grep . || true)
for n in $names; do stop_node "$n" & done
wait
for n in $names hub; do
    ns=$(netns "$n")
    [[ -e /run/netns/$ns ]] || continue
    # ip netns pids lists exactly the processes inside a namespace we created (none, normally:
    # every process of a node lives in its init's PID namespace and died with it).
    pids=$(ip netns pids "$ns" 2>/dev/null)
    if [[ -n $pids ]]; then
        kill -TERM $pids 2>/dev/null; sleep 1
        pids=$(ip netns pids "$ns" 2>/dev/null); [[ -n $pids ]] && kill -KILL $pids 2>/dev/null
    fi
    ip netns del "$ns" 2>/dev/null   # also removes its veth end; the bridge goes with the hub
done
rm -f "$DIR/nodes.env"
[[ ${1:-} == --purge ]] && rm -rf "$DIR"
echo "down.sh: simulated nodes ($PREFIX-*) under $DIR stopped" >&2
exit 0
