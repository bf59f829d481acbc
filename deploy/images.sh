#!/usr/bin/env bash
# Build fedge's container images from the wheel in dist/ (`make wheel`), on this machine as it is:
#
#   deploy/images.sh [IMAGE...]      IMAGE: server agent executor broker [all four]
#
# 1. A Docker daemon: the one that answers, else one started here (dockerd without bridge or iptables, as a
#    sandbox without those allows), left running for the next build: stop it with
#    `kill "$(cat "$FEDGE_IMAGES_STATE/dockerd.pid")"`.
# 2. The base image (BASE, python:3.11-slim): pulled, or, with no registry reachable, made here from Debian
#    bookworm by debootstrap (python3, venv, pip, this host's extra CA certificates) and imported under that
#    name.
# 3. pip inside the builds gets this host's pip configuration (`pip config list`): its indexes, find-links
#    and constraints, local directories served over loopback HTTP for the builds' host network.
# 4. fedge/server, fedge/agent, fedge/executor, fedge/broker, tagged with fedge's version; build time and
#    size printed for each.
#
# Settings (environment): FEDGE_IMAGES_STATE [/var/tmp/fedge-images] the daemon's log and pid; BASE;
# TORCH [torch==2.13.0+cpu] and TORCH_INDEX [https://download.pytorch.org/whl/cpu], for the CUDA build
# TORCH=torch==2.13.0 TORCH_INDEX=; FEDGE_INDEX_PORT [38471] the loopback port pip's files are served on.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${FEDGE_IMAGES_STATE:-/var/tmp/fedge-images}"
base="${BASE:-python:3.11-slim}"
torch="${TORCH:-torch==2.13.0+cpu}"
torch_index="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
index_port="${FEDGE_INDEX_PORT:-38471}"
images=("$@")
mkdir -p "${state}"
[[ ${#images[@]} -gt 0 ]] || images=(server agent executor broker)

say() { echo "images.sh: $*" >&2; }
answers() { python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$1" 2>/dev/null; }
die() {
    say "error: $*"
    exit 1
}

ensure_daemon() {
    if docker info >/dev/null 2>&1; then
        return
    fi
    command -v dockerd >/dev/null || die "no Docker daemon answers and dockerd is not installed (apt-get install docker.io)"
    [[ "$(id -u)" -eq 0 ]] || die "no Docker daemon answers; start one, or run this as root to start it here"
    say "starting dockerd (log ${state}/dockerd.log)"
    dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
        --pidfile "${state}/dockerd.pid" >"${state}/dockerd.log" 2>&1 &
    for _ in $(seq 1 120); do
        if docker info >/dev/null 2>&1; then
            say "dockerd is running (pid $(cat "${state}/dockerd.pid")); stop it with: kill \$(cat ${state}/dockerd.pid)"
            return
        fi
        sleep 0.5
    done
    die "dockerd did not answer within 60 s: see ${state}/dockerd.log"
}

ensure_base() {
    if docker image inspect "${base}" >/dev/null 2>&1; then
        return
    fi
    if docker pull "${base}" >/dev/null 2>&1; then
        return
    fi
    command -v debootstrap >/dev/null || die "cannot pull ${base} and debootstrap is not installed"
    say "no registry: making ${base} from Debian bookworm with debootstrap"
    local root
    root="$(mktemp -d "${TMPDIR:-/tmp}/fedge-base.XXXXXX")"
    trap 'rm -rf "${root}"' RETURN
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "${root}" >"${root}.log" 2>&1 || die "debootstrap failed: see ${root}.log"
    rm -f "${root}"/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf python3 "${root}/usr/bin/python"
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "${root}/usr/local/share/ca-certificates/"
        chroot "${root}" update-ca-certificates >/dev/null
    fi
    rm -rf "${root}"/var/lib/apt/lists/* "${root}"/var/cache/apt/archives/*.deb "${root}.log"
    tar -C "${root}" -c . | docker import --change 'CMD ["python3"]' - "${base}" >/dev/null
    say "made ${base}"
}

# pip's configuration for the builds, as build arguments; local paths become URLs under the loopback server.
pip_args=()
served=""
# $1: a path or file:// URL, $2: a number of its own; prints the URL a build sees (serving local files).
as_url() {
    local path="${1#file://}"
    if [[ "${path}" != /* ]]; then
        echo "$1"
    elif [[ -f "${path}" ]]; then
        cp "${path}" "${served}/f$2"
        echo "http://127.0.0.1:${index_port}/f$2"
    elif [[ "$(basename "${path}")" == simple ]]; then # an index's pages link ../../files: serve its parent
        ln -sfn "$(dirname "${path}")" "${served}/d$2"
        echo "http://127.0.0.1:${index_port}/d$2/simple"
    else
        ln -sfn "${path}" "${served}/d$2"
        echo "http://127.0.0.1:${index_port}/d$2/"
    fi
}
serve_pip_config() {
    local config key value item url seen="" n=0 indexes="" extra="" links="" constraint="" trusted="127.0.0.1"
    config="$(python3 -m pip config list 2>/dev/null || pip config list 2>/dev/null || true)"
    served="$(mktemp -d "${TMPDIR:-/tmp}/fedge-pip.XXXXXX")"
    while IFS= read -r line; do
        key="${line%%=*}"
        key="${key##*.}"
        value="${line#*=}"
        value="${value#\'}"
        value="${value%\'}"
        for item in ${value}; do
            [[ " ${seen} " != *" ${key}=${item} "* ]] || continue # the same setting from a file and the env
            seen="${seen} ${key}=${item}"
            n=$((n + 1))
            url="$(as_url "${item}" "${n}")"
            case "${key}" in
                index-url) indexes="${url}" ;;
                extra-index-url) extra="${extra:+${extra} }${url}" ;;
                find-links) links="${links:+${links} }${url}" ;;
                constraint) constraint="${url}" ;;
                trusted-host) trusted="${trusted} ${item}" ;;
            esac
        done
    done <<<"${config}"
    pip_args=(--build-arg "PIP_TRUSTED_HOST=${trusted}")
    [[ -z "${indexes}" ]] || pip_args+=(--build-arg "PIP_INDEX_URL=${indexes}")
    [[ -z "${extra}" ]] || pip_args+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra}")
    [[ -z "${links}" ]] || pip_args+=(--build-arg "PIP_FIND_LINKS=${links}")
    [[ -z "${constraint}" ]] || pip_args+=(--build-arg "PIP_CONSTRAINT=${constraint}")
    python3 -m http.server --bind 127.0.0.1 --directory "${served}" "${index_port}" >/dev/null 2>&1 &
    server_pid=$!
    for _ in $(seq 1 50); do
        if answers "http://127.0.0.1:${index_port}/"; then
            return
        fi
        kill -0 "${server_pid}" 2>/dev/null || die "cannot serve pip's files on 127.0.0.1:${index_port} (FEDGE_INDEX_PORT)"
        sleep 0.1
    done
    die "the loopback server for pip's files did not answer"
}
server_pid=""
stop_serving() {
    if [[ -n "${server_pid}" ]]; then
        kill "${server_pid}" 2>/dev/null || true
        wait "${server_pid}" 2>/dev/null || true
    fi
    [[ -z "${served}" ]] || rm -rf "${served}"
}
trap stop_serving EXIT

wheel="$(find "${repo}/dist" -maxdepth 1 -name 'fedge-*.whl' 2>/dev/null | head -n 1)"
[[ -n "${wheel}" ]] || die "no wheel in ${repo}/dist: run \`make wheel\` first"
[[ "$(find "${repo}/dist" -maxdepth 1 -name 'fedge-*.whl' | wc -l)" -eq 1 ]] || die "more than one wheel in dist/"
version="$(basename "${wheel}" | cut -d- -f2)"

if [[ -n "${torch_index}" ]] && ! answers "${torch_index%/}/torch/"; then
    say "${torch_index} does not answer: torch (${torch}) comes from pip's configuration"
    torch_index=""
fi

ensure_daemon
ensure_base
serve_pip_config
[[ -n "$(docker buildx version 2>/dev/null)" ]] || export DOCKER_BUILDKIT=0

for image in "${images[@]}"; do
    dockerfile="${repo}/deploy/docker/${image}.Dockerfile"
    [[ -f "${dockerfile}" ]] || die "no image ${image} (deploy/docker/${image}.Dockerfile)"
    start=${SECONDS}
    previous="$(docker image inspect --format '{{.Id}}' "fedge/${image}:${version}" 2>/dev/null || true)"
    if ! docker build --network host --file "${dockerfile}" --tag "fedge/${image}:${version}" \
        --build-arg "BASE=${base}" --build-arg "TORCH=${torch}" --build-arg "TORCH_INDEX=${torch_index}" \
        "${pip_args[@]}" "${repo}" >"${state}/build-${image}.log" 2>&1; then
        tail -n 30 "${state}/build-${image}.log" >&2
        die "building fedge/${image} failed: see ${state}/build-${image}.log"
    fi
    size="$(docker image inspect --format '{{.Size}}' "fedge/${image}:${version}")"
    if [[ -n "${previous}" && "$(docker image inspect --format '{{len .RepoTags}}' "${previous}")" == 0 ]]; then
        docker image rm "${previous}" >/dev/null 2>&1 || true # the build this one replaced, unless in use
    fi
    printf 'fedge/%s:%s  built in %d s, %d MB\n' "${image}" "${version}" $((SECONDS - start)) $((size / 1000000))
done
