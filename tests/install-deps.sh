#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 (run as root): MariaDB server
# binaries (the tests start their own private mariadbd; no system server is used),
# Postfix with Cyrus SASL (private instances started by the tests), a C compiler for the
# benchmark, and the Python packages. Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || need_apt+=(mariadb-server)
command -v mariadb-install-db >/dev/null 2>&1 || need_apt+=(mariadb-server)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ -f tests/install-postfix.sh ]; then
    bash tests/install-postfix.sh
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test,lint]'
