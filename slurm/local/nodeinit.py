"""PID 1 of a simulated node (slurm/local/up.sh --nodes N): holds the node's namespaces and reaps
orphans (daemons started with setsid or `ray start` are re-parented to it).

SIGTERM = clean shutdown: TERM every process of the node, wait up to NODE_STOP_GRACE seconds, exit;
when PID 1 exits the kernel SIGKILLs whatever is left in the PID namespace. SIGKILL from the host
= power cut. argv (state dir, node name) only makes the process recognisable from the host.
"""

import os
import signal
import socket
import sys
import time


def stop(*_):
    try:
        os.kill(-1, signal.SIGTERM)  # every process in this PID namespace except ourselves
    except ProcessLookupError:
        pass
    deadline = time.time() + float(os.environ.get("NODE_STOP_GRACE", "3"))
    while time.time() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.1)
        except ChildProcessError:
            break
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
print(f"node {socket.gethostname()} up", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
