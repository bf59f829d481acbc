# The edge agent (fedge[agent]: torch, no flwr, no FastAPI). Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t fedge/agent .
# Configure it with FEDGE_SERVER, FEDGE_BROKER, FEDGE_DATA (and FEDGE_CA/CERT/KEY or files in /var/lib/fedge-agent).
ARG BASE=python:3.11-slim
FROM ${BASE}
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
    && pip install --no-cache-dir ".[agent]" \
    && useradd --system --uid 10001 --home-dir /var/lib/fedge-agent --create-home fedge
USER 10001
WORKDIR /var/lib/fedge-agent
# SIGTERM lets a round in flight finish and keeps its update: give it time (docker stop -t, stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["fedge", "agent", "run"]
CMD ["--dir", "/var/lib/fedge-agent"]
