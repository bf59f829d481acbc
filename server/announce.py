"""Round announcements on MQTT, and the clients' statuses heard there as signs of life.

The current round goes out QoS 1 and retained after every change. Retained means a device that connects
late, or comes back after a night offline, gets the round that is open now as soon as it subscribes. The
announcement is republished on every (re)connection of the server, so a broker that lost its retained
messages (restarted without persistence) is corrected at once.

The server also reads every client's status topic: a status is written by that client's own certificate
only (the broker's ACL), and the broker refuses revoked and superseded certificates (its CRL), so a status is
the client showing a certificate that counts, and it is seen (``server.presence``); a client that says it
stopped is no longer. A status the broker kept (retained) counts from when the agent wrote it.
"""

from __future__ import annotations

import time

import paho.mqtt.client as paho
from pydantic import ValidationError

from fedge import mqtt
from fedge.client.status import AgentState, AgentStatus
from fedge.security.broker import username
from fedge.security.pki import Credentials, Role
from fedge.server.presence import Presence
from fedge.server.rounds import Federation
from fedge.wire import RoundInfo, rounds_topic, status_topic


def announcement(info: RoundInfo) -> bytes:
    """The payload: the round as ``GET /v1/rounds/current`` returns it (round, state, deadline, model
    sha256, task, selected clients, training config)."""
    return info.model_dump_json().encode()


def sighting(
    topic: str, payload: bytes, retained: bool, federation: str, now: float
) -> tuple[str, float, bool] | None:
    """(client, when, still running) from a status message, None for anything else. The client is the one
    the topic names (only its certificate may write there); a retained status counts from the time the
    agent wrote it, never later than ``now``, a fresh one from ``now``."""
    prefix, suffix = status_topic(federation, "\0").split("\0")
    if not (topic.startswith(prefix) and topic.endswith(suffix)):
        return None
    client = topic[len(prefix) : len(topic) - len(suffix)]
    try:
        status = AgentStatus.model_validate_json(payload)
    except ValidationError:
        return None
    if status.client != client:
        return None
    return client, min(status.updated, now) if retained else now, status.state is not AgentState.STOPPED


class Announcer:
    def __init__(
        self, federation: Federation, broker: mqtt.BrokerAddress, creds: Credentials, presence: Presence
    ) -> None:
        self._federation = federation
        self._presence = presence
        self._name = federation.settings.federation
        self._topic = rounds_topic(self._name)
        self._client = mqtt.client(
            broker, creds, username(Role.SERVER, "server"), self._on_connect, on_message=self._on_message
        )
        federation.subscribe(self.publish)

    def _on_connect(self, client: paho.Client) -> None:
        client.subscribe(status_topic(self._name, "+"), qos=1)
        self.publish()

    def _on_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        seen = sighting(message.topic, message.payload, bool(message.retain), self._name, time.time())
        if seen is None:
            return
        client, at, running = seen
        if running:
            self._presence.seen(client, at)
        else:
            self._presence.gone(client, at)

    def publish(self) -> None:
        """Called on every round change; paho queues a QoS 1 message while the broker is away."""
        payload = announcement(self._federation.round_info())
        self._client.publish(self._topic, payload, qos=1, retain=True)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
