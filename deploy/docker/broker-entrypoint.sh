#!/bin/sh
# mosquitto, reloaded (SIGHUP) when a file its configuration names as acl_file or crlfile changes: `fedge pki
# revoke` / `enroll` rewrite them on the host, and a broker in a container gets no signal from there. Polling
# (every FEDGE_BROKER_POLL seconds, default 2) also sees a Kubernetes secret or config map swapped under it.
set -eu
conf="${1:-/mosquitto/config/mosquitto.conf}"
poll="${FEDGE_BROKER_POLL:-2}"
watched=$(awk '$1 == "acl_file" || $1 == "crlfile" { print $2 }' "${conf}")

stamp() {
    for file in ${watched}; do
        stat -L -c '%n %Y %s %i' "${file}" 2>/dev/null || echo "${file} missing"
    done
}

mosquitto -c "${conf}" &
broker=$!
trap 'kill -TERM "${broker}" 2>/dev/null' TERM INT
last=$(stamp)
while kill -0 "${broker}" 2>/dev/null; do
    sleep "${poll}" &
    wait $! || true
    now=$(stamp)
    if [ "${now}" != "${last}" ]; then
        last="${now}"
        echo "broker-entrypoint: ACL or CRL changed: reloading mosquitto"
        kill -HUP "${broker}"
    fi
done
wait "${broker}"
