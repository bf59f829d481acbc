# train/evaluate as an HTTP function behind OpenFaaS's of-watchdog, which also serves Knative (port 8080):
# deploy/openfaas/stack.yml and deploy/knative/service.yaml run it. From the wheel in dist/ (`make wheel`):
#   docker build -f deploy/docker/function.Dockerfile -t fedge/function .
# (deploy/images.sh builds it when asked, `deploy/images.sh function`, where ghcr.io is reachable.)
ARG BASE=python:3.11-slim
ARG WATCHDOG=ghcr.io/openfaas/of-watchdog:0.10.7
FROM ${WATCHDOG} AS watchdog

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
COPY --from=watchdog /fwatchdog /usr/bin/fwatchdog
# hadolint ignore=DL3013
RUN python -m pip install "${TORCH}" ${TORCH_INDEX:+--extra-index-url "${TORCH_INDEX}"}
COPY pyproject.toml deploy/docker/requirements.py /tmp/fedge/
# hadolint ignore=DL3013
RUN python /tmp/fedge/requirements.py /tmp/fedge/pyproject.toml executor > /tmp/fedge/requirements.txt \
    && python -m pip install -r /tmp/fedge/requirements.txt \
    && useradd --system --uid 10001 --home-dir /var/lib/fedge-function --create-home fedge
COPY dist/fedge-*.whl /tmp/fedge/
RUN python -m pip install --no-deps /tmp/fedge/fedge-*.whl && rm -rf /tmp/fedge
USER 10001
# A directory of no source tree: uvicorn puts the working directory on sys.path.
WORKDIR /var/lib/fedge-function
ENV mode=http \
    upstream_url=http://127.0.0.1:8082 \
    fprocess="uvicorn fedge.edge_functions.adapters.http:app --host 127.0.0.1 --port 8082" \
    ready_path=/healthz \
    exec_timeout=900s
EXPOSE 8080
HEALTHCHECK --interval=10s CMD ["sh", "-c", "test -e /tmp/.lock"]
CMD ["fwatchdog"]
