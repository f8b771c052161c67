"""Control and data streams of a multi-stream connection (MQTT over QUIC), without I/O.

The connection's control stream drives a :class:`ControlChannel`, an ordinary channel that also
remembers why the server disconnected it (so the transport can close the QUIC connection with
that code for takeover and kick): CONNECT, the session,
keepalive, will, takeover. Each later data stream is a :class:`StreamChannel`, a channel that is
born connected as the same client (client id, username, protocol version, limits) and has its own
small :class:`Session` for what must be per stream: packet ids, the outgoing inflight window, QoS 2
packet ids awaiting PUBREL and the subscriptions made on the stream. So a SUBSCRIBE on a stream
makes that stream deliver the matching messages, every ack goes back on the stream its request
came on, and closing the stream ends its subscriptions and nothing else. The stream session is
registered in the router under ``<client id>\\x00<stream id>`` (a key no client can choose), so
it never collides with the control stream's subscriptions; it is never stored in
``broker.registry`` and it ends with the stream (expiry 0).
"""

from __future__ import annotations

from roost.broker.channel import Channel, Transport
from roost.mqtt import reason_codes as RC
from roost.mqtt.codec import Decoder
from roost.mqtt.errors import MQTTError
from roost.mqtt.packets import (
    Packet,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    Unsubscribe,
)

#: What a client may send on a data stream (types 3 to 10; 9 and 11 are the server's acks).
_DATA_STREAM_TYPES = (Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe, Unsubscribe)


class ControlChannel(Channel):
    """The channel of a control stream; ``close_reason`` is the server's DISCONNECT reason."""

    close_reason = 0

    def disconnect(self, reason: int, reason_string: str = "", server_reference: str = "") -> None:
        if not self.closed:
            self.close_reason = reason
        super().disconnect(reason, reason_string, server_reference)


class StreamChannel(Channel):
    def __init__(self, parent: Channel, transport: Transport, stream_id: int) -> None:
        super().__init__(parent.broker, transport, parent.peer, parent.listener)
        self.parent = parent
        self.stream_id = stream_id
        # A stream is not a connection: node limits, timers and shutdown go by the control
        # stream's channel, which ends its streams with it.
        self.broker.registry.channel_closed(self)
        if self.closed:
            return  # refused: the node is at its connection limit
        self.pub_limiter = parent.pub_limiter  # one publish rate per client, however many streams
        self.version = parent.version
        self.v5 = parent.v5
        self.client_id = parent.client_id
        self.username = parent.username
        self.window = parent.window
        self.client_max_packet = parent.client_max_packet
        self.alias_max = parent.alias_max
        self.problem_info = parent.problem_info
        self.decoder = Decoder(
            max_packet_size=self.broker.config.mqtt.max_packet_size, version=parent.version
        )
        session = self.broker.new_session(f"{parent.client_id}\x00{stream_id}")
        session.owner = parent.client_id
        session.channel = self
        self.session = session
        self.connected = True  # keepalive stays 0: the control stream's channel watches it

    def data_received(self, data: bytes) -> None:
        # Keepalive counts traffic on any stream of the connection.
        self.parent.last_rx = self.now()
        super().data_received(data)

    def _handle(self, packet: Packet) -> None:
        if not isinstance(packet, _DATA_STREAM_TYPES):
            raise MQTTError(
                f"{type(packet).__name__.upper()} is not allowed on a data stream",
                RC.PROTOCOL_ERROR,
            )
        super()._handle(packet)

    def disconnect(self, reason: int, reason_string: str = "", server_reference: str = "") -> None:
        """DISCONNECT belongs on the control stream: an error here ends the whole connection."""
        self.parent.disconnect(reason, reason_string, server_reference)
        self.close()
