"""MQTT on the federation's broker: a paho client over mutual TLS (the topic names are in ``fedge.wire``).

Both ends use one recipe: MQTT v5, the federation's client certificate, a persistent session (so QoS 1
messages sent while a device was offline wait for it), and paho's own reconnect loop with exponential
backoff, started without blocking so that a broker that is down at start-up is simply retried.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedge.security.pki import Credentials
from fedge.security.tls import client_context

SESSION_EXPIRY_SECONDS = 7 * 24 * 3600
RECONNECT_MIN_SECONDS = 1
RECONNECT_MAX_SECONDS = 30


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> BrokerAddress:
        match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", value)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ValueError(f"invalid broker address {value!r}: use HOST:PORT")
        return cls(match.group(1), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def unresolved(broker: BrokerAddress) -> str | None:
    """Why ``broker``'s host does not resolve now, or None. A command says it once at start-up: paho's
    reconnect loop retries such a host (with backoff) without a word."""
    try:
        socket.getaddrinfo(broker.host, broker.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"the broker host {broker.host!r} does not resolve ({exc.strerror})"
    return None


def client(
    broker: BrokerAddress,
    creds: Credentials,
    client_id: str,
    on_connect: Callable[[mqtt.Client], None],
    on_disconnect: Callable[[mqtt.Client], None] = lambda _: None,
    on_message: Callable[[mqtt.Client, object, mqtt.MQTTMessage], None] | None = None,
    on_subscribe: Callable[[mqtt.Client, list[mqtt.ReasonCode]], None] | None = None,
) -> mqtt.Client:
    """Start connecting in the background; ``on_connect`` runs after every (re)connection, and
    ``on_subscribe`` with the broker's answer to each subscription (a refusal is a failed reason code)."""
    paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    paho.on_message = on_message
    if on_subscribe is not None:
        paho.on_subscribe = lambda c, _u, _mid, reasons, _p: on_subscribe(c, reasons)
    paho.tls_set_context(client_context(creds))
    paho.reconnect_delay_set(RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS)

    def connected(c: mqtt.Client, _u: object, _f: object, reason: mqtt.ReasonCode, _p: object) -> None:
        if not reason.is_failure:
            on_connect(c)

    paho.on_connect = connected
    paho.on_disconnect = lambda c, *_: on_disconnect(c)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
    paho.connect_async(broker.host, broker.port, keepalive=30, clean_start=False, properties=properties)
    paho.loop_start()
    return paho
