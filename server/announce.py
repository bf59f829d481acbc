"""Round announcements on MQTT: the current round, QoS 1 and retained, after every change.

Retained means a device that connects late, or comes back after a night offline, gets the round that is
open now as soon as it subscribes. The announcement is republished on every (re)connection of the server,
so a broker that lost its retained messages (restarted without persistence) is corrected at once.
"""

from __future__ import annotations

from fedge import mqtt
from fedge.security.broker import username
from fedge.security.pki import Credentials, Role
from fedge.server.rounds import Federation
from fedge.wire import RoundInfo, rounds_topic


def announcement(info: RoundInfo) -> bytes:
    """The payload: the round as ``GET /v1/rounds/current`` returns it (round, state, deadline, model
    sha256, task, selected clients, training config)."""
    return info.model_dump_json().encode()


class Announcer:
    def __init__(self, federation: Federation, broker: mqtt.BrokerAddress, creds: Credentials) -> None:
        self._federation = federation
        self._topic = rounds_topic(federation.settings.federation)
        self._client = mqtt.client(broker, creds, username(Role.SERVER, "server"), lambda _: self.publish())
        federation.subscribe(self.publish)

    def publish(self) -> None:
        """Called on every round change; paho queues a QoS 1 message while the broker is away."""
        payload = announcement(self._federation.round_info())
        self._client.publish(self._topic, payload, qos=1, retain=True)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
