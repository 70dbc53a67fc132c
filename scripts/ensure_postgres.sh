#!/usr/bin/env bash
# Install Debian's PostgreSQL server (for tests/backends) unless its binaries are already there. Quiet, non-interactive.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
echo "postgresql installed: $(ls -d /usr/lib/postgresql/*/bin)"
