# The function image: train/evaluate as an HTTP function behind OpenFaaS's of-watchdog, which also serves
# Knative (port 8080). On a CUDA base (the default) it is the cloud GPU executor; with
# --build-arg BASE=python:3.11-slim --build-arg TORCH=torch==2.13.0 it is a CPU function.
#   docker build -f deploy/docker/executor.Dockerfile -t fedge/executor .
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ARG WATCHDOG=ghcr.io/openfaas/of-watchdog:0.10.7
FROM ${WATCHDOG} AS watchdog

FROM ${BASE}
# Empty on a base that ships torch (the CUDA images); a requirement such as torch==2.13.0 otherwise.
ARG TORCH=""
ARG PIP_INDEX_URL
COPY --from=watchdog /fwatchdog /usr/bin/fwatchdog
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fedge fedge
COPY server server
COPY client client
COPY edge_functions edge_functions
COPY security security
# The requirements are pinned by the TORCH build argument and by the source tree itself.
# hadolint ignore=DL3013
RUN if [ -n "${TORCH}" ]; then pip install --no-cache-dir "${TORCH}"; fi \
    && pip install --no-cache-dir ".[executor]" \
    && useradd --system --uid 10001 --create-home fedge
USER 10001
ENV mode=http \
    upstream_url=http://127.0.0.1:8082 \
    fprocess="uvicorn fedge.edge_functions.adapters.http:app --host 127.0.0.1 --port 8082" \
    ready_path=/healthz \
    exec_timeout=900s
EXPOSE 8080
HEALTHCHECK --interval=10s CMD ["sh", "-c", "test -e /tmp/.lock"]
CMD ["fwatchdog"]
