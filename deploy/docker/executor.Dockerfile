# The cloud executor (`fedge executor`): trains clients' rounds for them under their grants, on a GPU when the
# image has CUDA torch. From the wheel in dist/ (`make wheel`); deploy/images.sh builds it, by hand:
#   docker build -f deploy/docker/executor.Dockerfile -t fedge/executor .
# CPU torch by default; the CUDA build: --build-arg TORCH=torch==2.13.0 --build-arg TORCH_INDEX=
# Run it with the executor's credentials (fedge pki executor-cert) mounted at /etc/fedge/pki and
#   --id ID --server https://SERVER:8443
ARG BASE=python:3.11-slim
FROM ${BASE}
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
RUN python /tmp/fedge/requirements.py /tmp/fedge/pyproject.toml executor > /tmp/fedge/requirements.txt \
    && python -m pip install -r /tmp/fedge/requirements.txt \
    && useradd --system --uid 10001 --home-dir /var/lib/fedge-executor --create-home fedge
COPY dist/fedge-*.whl /tmp/fedge/
RUN python -m pip install --no-deps /tmp/fedge/fedge-*.whl && rm -rf /tmp/fedge
USER 10001
# A directory of no source tree: nothing on sys.path can shadow the installed package.
WORKDIR /var/lib/fedge-executor
EXPOSE 8443
ENTRYPOINT ["fedge", "executor"]
CMD ["--pki", "/etc/fedge/pki", "--host", "0.0.0.0", "--port", "8443"]
