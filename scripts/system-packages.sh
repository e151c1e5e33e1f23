#!/usr/bin/env bash
# The Debian packages behind the real-component tests, installed when this machine can (root or
# passwordless sudo, apt-get): used by `make test` and by .ci/run, so both test the same things.
#   slurm-wlm  slurmctld/slurmd/sbatch: tests/test_slurm.py, tests/test_two_nodes_slurm.py
#   chromium   headless screenshots of the report pages: tests/test_nightly.py
#   iproute2   `ip netns`/`tc` for the local multi-node harness (slurm/local/up.sh --nodes N)
# Prints what is still missing (and so which tests will skip) and exits 0 (1 under CI=…): a machine
# without root still runs every other test; pytest's summary repeats the list at the end.
set -uo pipefail

declare -A PACKAGE_OF=([sbatch]=slurm-wlm [slurmctld]=slurm-wlm [slurmd]=slurm-wlm [chromium]=chromium [ip]=iproute2)
PATH=$PATH:/usr/sbin:/sbin

missing_packages() {
    local command packages=()
    for command in "${!PACKAGE_OF[@]}"; do
        command -v "$command" >/dev/null 2>&1 || packages+=("${PACKAGE_OF[$command]}")
    done
    printf '%s\n' "${packages[@]}" | sort -u | grep -v '^$'
}

mapfile -t wanted < <(missing_packages)
if [ ${#wanted[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
fi
if [ "$SUDO" != "none" ] && command -v apt-get >/dev/null 2>&1; then
    echo "system-packages: installing ${wanted[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >&2 && $SUDO apt-get install -y -qq --no-install-recommends "${wanted[@]}" >&2 \
        || echo "system-packages: apt-get failed" >&2
fi
mapfile -t still < <(missing_packages)
if [ ${#still[@]} -gt 0 ]; then
    {
        echo "################################################################################"
        echo "system-packages: NOT INSTALLED: ${still[*]} (needs root + apt-get)."
        echo "The tests that use them will SKIP; see the summary at the end of the test run."
        echo "################################################################################"
    } >&2
    # CI must test what the README says: a missing package there is a failure, not a skip.
    if [ -n "${CI:-}" ]; then exit 1; fi
fi
exit 0
