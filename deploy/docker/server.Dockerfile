# The aggregation service (`fedge server`), from the wheel in dist/ (`make wheel`). deploy/images.sh builds it
# (with this machine's pip configuration); by hand, from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t fedge/server .
# No CUDA (torch only builds the task's initial model) and nothing only training needs (fedge[server] alone).
ARG BASE=python:3.11-slim
FROM ${BASE}
# The CPU build of torch; the CUDA one: --build-arg TORCH=torch==2.13.0 --build-arg TORCH_INDEX=
ARG TORCH=torch==2.13.0+cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# pip's settings for the build (deploy/images.sh passes the host's): indexes, find-links, constraints.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_TRUSTED_HOST
ARG PIP_DEFAULT_TIMEOUT=60
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
# Dependencies first, each layer keyed by what it installs: a code change rebuilds only the last layer.
# hadolint ignore=DL3013
RUN python -m pip install "${TORCH}" ${TORCH_INDEX:+--extra-index-url "${TORCH_INDEX}"}
COPY pyproject.toml deploy/docker/requirements.py /tmp/fedge/
# hadolint ignore=DL3013
RUN python /tmp/fedge/requirements.py /tmp/fedge/pyproject.toml server > /tmp/fedge/requirements.txt \
    && python -m pip install -r /tmp/fedge/requirements.txt \
    && useradd --system --uid 10001 --home-dir /var/lib/fedge --create-home fedge
COPY dist/fedge-*.whl /tmp/fedge/
RUN python -m pip install --no-deps /tmp/fedge/fedge-*.whl && rm -rf /tmp/fedge
USER 10001
WORKDIR /var/lib/fedge
EXPOSE 8443
# Healthy once it accepts connections (`docker compose up --wait` waits for it).
HEALTHCHECK --interval=2s --start-period=120s CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8443), 2)"]
ENTRYPOINT ["fedge", "server"]
CMD ["--pki", "/etc/fedge/pki", "--data", "/var/lib/fedge/state", "--host", "0.0.0.0", "--port", "8443"]
