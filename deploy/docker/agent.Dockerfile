# The edge agent (fedge[agent]: torch, no flwr, no FastAPI), from the wheel in dist/ (`make wheel`).
# deploy/images.sh builds it; by hand, from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t fedge/agent .
# The entrypoint is `fedge agent`: `docker run IMG enroll --server ... --token ...` enrolls into the state volume,
# and the default command runs the agent (FEDGE_SERVER, FEDGE_BROKER, FEDGE_DATA configure it).
ARG BASE=python:3.11-slim
FROM ${BASE}
# The CPU build of torch; the CUDA one: --build-arg TORCH=torch==2.13.0 --build-arg TORCH_INDEX=
ARG TORCH=torch==2.13.0+cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_TRUSTED_HOST
ARG PIP_DEFAULT_TIMEOUT=60
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
# hadolint ignore=DL3013
RUN python -m pip install "${TORCH}" ${TORCH_INDEX:+--extra-index-url "${TORCH_INDEX}"}
COPY pyproject.toml deploy/docker/requirements.py /tmp/fedge/
# hadolint ignore=DL3013
RUN python /tmp/fedge/requirements.py /tmp/fedge/pyproject.toml agent > /tmp/fedge/requirements.txt \
    && python -m pip install -r /tmp/fedge/requirements.txt \
    && useradd --system --uid 10001 --home-dir /var/lib/fedge-agent --create-home fedge
COPY dist/fedge-*.whl /tmp/fedge/
RUN python -m pip install --no-deps /tmp/fedge/fedge-*.whl && rm -rf /tmp/fedge
USER 10001
WORKDIR /var/lib/fedge-agent
# SIGTERM lets a round in flight finish and keeps its update: give it time (docker stop -t, stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["fedge", "agent"]
CMD ["run", "--dir", "/var/lib/fedge-agent"]
