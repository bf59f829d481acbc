# The MQTT broker (Debian's mosquitto), with a watcher that reloads it when `fedge pki` rewrites its ACL or
# CRL: fedge's own SIGHUP cannot cross into a container. deploy/images.sh builds it; by hand:
#   docker build -f deploy/docker/broker.Dockerfile -t fedge/broker .
# Its configuration (`fedge broker config --mount /mosquitto/config --persistence /mosquitto/data`) is
# mounted at /mosquitto/config. mosquitto starts as root, reads its key, and drops to its own user.
ARG BASE=python:3.11-slim
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o mosquitto -g mosquitto /mosquitto/data
COPY deploy/docker/broker-entrypoint.sh /usr/local/bin/broker-entrypoint
EXPOSE 8883
ENTRYPOINT ["/usr/local/bin/broker-entrypoint"]
CMD ["/mosquitto/config/mosquitto.conf"]
