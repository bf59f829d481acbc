#!/usr/bin/env bash
# Install the fedge agent on a Debian/Ubuntu device as a systemd service.
#
#   sudo deploy/install.sh [SOURCE]     SOURCE: a fedge wheel, sdist or source tree [this repository]
#
# Afterwards: put the device's credentials in /var/lib/fedge-agent (or enroll it), edit /etc/fedge/agent.env,
# then `systemctl enable --now fedge-agent`. Set ROOT to install into a staging directory instead of /, and
# TORCH to the torch requirement [torch==2.13.0] (torch==2.13.0+cpu with PyTorch's CPU index: no CUDA).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source="${1:-${here}/..}"
root="${ROOT:-}"
prefix="${root}/opt/fedge"
torch="${TORCH:-torch==2.13.0}"

if [[ -z "${root}" && "$(id -u)" -ne 0 ]]; then
    echo "error: run as root (or set ROOT to a staging directory)" >&2
    exit 1
fi

if [[ -z "${root}" ]] && ! id fedge >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/fedge-agent --shell /usr/sbin/nologin fedge
fi

python3 -m venv "${prefix}/venv"
"${prefix}/venv/bin/pip" install --quiet --upgrade pip
"${prefix}/venv/bin/pip" install --quiet "${torch}"
"${prefix}/venv/bin/pip" install --quiet "${source}[agent]"

install -d -m 0755 "${root}/etc/fedge"
if [[ ! -e "${root}/etc/fedge/agent.env" ]]; then
    install -m 0640 /dev/stdin "${root}/etc/fedge/agent.env" <<'ENV'
# Settings of `fedge agent run` (flags > these variables > fedge.toml)
FEDGE_SERVER=https://fl.example.test:8443
FEDGE_BROKER=fl.example.test:8883
FEDGE_DATA=/var/lib/fedge-agent/data.npz
ENV
fi
install -D -m 0644 "${here}/systemd/fedge-agent.service" "${root}/etc/systemd/system/fedge-agent.service"

if [[ -z "${root}" ]]; then
    chgrp fedge /etc/fedge/agent.env
    if [[ -d /run/systemd/system ]]; then # not in a container or chroot that runs no systemd
        systemctl daemon-reload
    fi
fi
echo "fedge agent installed in ${prefix}; next: credentials, /etc/fedge/agent.env, systemctl enable --now fedge-agent"
