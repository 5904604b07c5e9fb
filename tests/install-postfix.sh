#!/usr/bin/env bash
# Install what tests/test_postfix_e2e.py needs on Debian 12, as root, without prompts.
# The tests start their own private loopback Postfix instance (tests/fixtures_postfix.py), so the
# system Postfix is installed with debconf's "No configuration": no /etc/postfix/main.cf is
# written and nothing listens on port 25. Safe to run again: installed packages are left alone.
set -euo pipefail

PACKAGES=(
    postfix              # master, smtpd, postconf, postfix(1)
    sasl2-bin            # saslpasswd2, to create the test users' sasldb
    libsasl2-modules     # the PLAIN and LOGIN mechanisms
    libsasl2-modules-db  # the sasldb auxprop plugin
)

if [[ $(id -u) -ne 0 ]]; then
    echo "install-postfix.sh: must run as root" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-postfix.sh: already installed: ${PACKAGES[*]}"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# "No configuration": the package neither asks questions nor writes a main.cf that would make a
# system Postfix listen on port 25. mailname is preseeded too in case another type was chosen.
debconf-set-selections <<'EOF'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string localhost
EOF

# Keep the maintainer scripts from starting services during the install, unless the machine
# already has its own policy (containers usually do); ours is removed again on exit.
own_policy=no
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    own_policy=yes
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi

postfix_was_installed=no
[[ " ${missing[*]} " == *" postfix "* ]] || postfix_was_installed=yes

apt-get update -q
apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"

# A Postfix this script installed must not run as a system service: the tests never use it.
if [[ $postfix_was_installed == no ]]; then
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        systemctl disable --now postfix.service >/dev/null 2>&1 || true
    fi
    if [[ -f /etc/postfix/main.cf ]] && postfix status >/dev/null 2>&1; then
        postfix stop || true
    fi
fi
[[ $own_policy == no ]] || echo "install-postfix.sh: services were kept from starting"
echo "install-postfix.sh: installed: ${missing[*]}"
