#!/bin/sh
# Install the real SMTP peers the integration tests and benchmarks use:
# Postfix (with smtp-source and smtp-sink) and swaks.  Run as root on Debian.
#
# The system Postfix instance must stay unconfigured and stopped: the tests
# run private instances of their own, each on one loopback address.  Debconf
# is preseeded with "No configuration", so the package writes no main.cf, and
# a policy-rc.d that refuses every start keeps invoke-rc.d from starting the
# daemon while the package installs.
set -eu

export DEBIAN_FRONTEND=noninteractive

echo "postfix postfix/main_mailer_type select No configuration" \
    | debconf-set-selections

created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Exit status 101 means "action forbidden" to invoke-rc.d.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=yes
fi

apt-get update
apt-get install -y --no-install-recommends postfix swaks

if [ -n "$created_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
fi

# Nothing of the package may listen: no socket of a Postfix master outside
# the private test instances on 127.0.0.0/8, and nothing at all on port 25.
if ss -ltnupH | grep -v -E ' 127\.[0-9.]+:[0-9]+ ' | grep -q '"master"'; then
    echo "install-peers: a Postfix master listens off loopback" >&2
    exit 1
fi
if ss -ltnH 'sport = :25' | grep -q .; then
    echo "install-peers: something listens on port 25" >&2
    exit 1
fi
echo "install-peers: postfix and swaks installed; the system Postfix is not running"
