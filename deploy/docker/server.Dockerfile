# The aggregation service. Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t fedge/server .
ARG BASE=python:3.11-slim
FROM ${BASE}
# torch builds the task's initial model; pass the CPU build's requirement (and PIP_INDEX_URL) as needed.
ARG TORCH=torch==2.13.0
ARG PIP_INDEX_URL
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fedge fedge
COPY server server
COPY client client
COPY edge_functions edge_functions
COPY security security
# The requirements are pinned by the TORCH build argument and by the source tree itself.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH}" \
    && pip install --no-cache-dir ".[server,agent]" \
    && useradd --system --uid 10001 --home-dir /var/lib/fedge --create-home fedge
USER 10001
WORKDIR /var/lib/fedge
EXPOSE 8443
ENTRYPOINT ["fedge", "server"]
CMD ["--pki", "/etc/fedge/pki", "--data", "/var/lib/fedge/state", "--host", "0.0.0.0", "--port", "8443"]
