"""The 15 MQTT control packets as small slotted classes (no per-packet ``__dict__``)."""

from __future__ import annotations

from typing import Any, ClassVar

from roost.mqtt import properties as P

MQTT_3_1 = 3
MQTT_3_1_1 = 4
MQTT_5 = 5


_FIELDS: dict[type, tuple[str, ...]] = {}


def _fields(cls: type) -> tuple[str, ...]:
    """Every slot of ``cls`` and its bases, base first; collected once per class.

    ``cls.__slots__`` alone is not enough: the ack classes declare ``()`` and inherit their
    fields' slots, so comparing only those would make any two PUBACKs equal.
    """
    names = _FIELDS.get(cls)
    if names is None:
        found: list[str] = []
        for klass in reversed(cls.__mro__):
            slots = klass.__dict__.get("__slots__", ())
            found += [slots] if isinstance(slots, str) else slots
        names = _FIELDS[cls] = tuple(found)
    return names


class Packet:
    __slots__ = ()
    type: ClassVar[int] = 0

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in _fields(type(self)))

    __hash__ = None  # type: ignore[assignment]  # mutable, equal by value: tell mypy unhashable

    def __repr__(self) -> str:
        fields = ", ".join(f"{s}={getattr(self, s)!r}" for s in _fields(type(self)))
        return f"{type(self).__name__}({fields})"


class Will:
    __slots__ = ("payload", "properties", "qos", "retain", "topic")

    def __init__(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties if properties is not None else {}

    __eq__ = Packet.__eq__
    __repr__ = Packet.__repr__
    __hash__ = None  # type: ignore[assignment]  # mutable, equal by value: tell mypy unhashable


class Connect(Packet):
    __slots__ = (
        "clean_start",
        "client_id",
        "keepalive",
        "password",
        "properties",
        "protocol_name",
        "protocol_version",
        "username",
        "will",
    )
    type = P.CONNECT

    def __init__(
        self,
        client_id: str = "",
        protocol_version: int = MQTT_3_1_1,
        clean_start: bool = True,
        keepalive: int = 60,
        username: str | None = None,
        password: bytes | None = None,
        will: Will | None = None,
        properties: dict[str, Any] | None = None,
        protocol_name: str | None = None,
    ) -> None:
        self.client_id = client_id
        self.protocol_version = protocol_version
        self.protocol_name = protocol_name or ("MQIsdp" if protocol_version == MQTT_3_1 else "MQTT")
        self.clean_start = clean_start
        self.keepalive = keepalive
        self.username = username
        self.password = password
        self.will = will
        self.properties = properties if properties is not None else {}


class Connack(Packet):
    __slots__ = ("properties", "reason_code", "session_present")
    type = P.CONNACK

    def __init__(
        self,
        reason_code: int = 0,
        session_present: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> None:
        self.reason_code = reason_code
        self.session_present = session_present
        self.properties = properties if properties is not None else {}


class Publish(Packet):
    __slots__ = ("dup", "packet_id", "payload", "properties", "qos", "retain", "topic")
    type = P.PUBLISH

    def __init__(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        packet_id: int | None = None,
        properties: dict[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.properties = properties if properties is not None else {}


class _Ack(Packet):
    """PUBACK, PUBREC, PUBREL and PUBCOMP share one shape."""

    __slots__ = ("packet_id", "properties", "reason_code")

    def __init__(
        self, packet_id: int, reason_code: int = 0, properties: dict[str, Any] | None = None
    ) -> None:
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = properties if properties is not None else {}


class Puback(_Ack):
    __slots__ = ()
    type = P.PUBACK


class Pubrec(_Ack):
    __slots__ = ()
    type = P.PUBREC


class Pubrel(_Ack):
    __slots__ = ()
    type = P.PUBREL


class Pubcomp(_Ack):
    __slots__ = ()
    type = P.PUBCOMP


class Subscription:
    """One topic filter of a SUBSCRIBE with its options."""

    __slots__ = ("no_local", "qos", "retain_as_published", "retain_handling", "topic_filter")

    def __init__(
        self,
        topic_filter: str,
        qos: int = 0,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
    ) -> None:
        self.topic_filter = topic_filter
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling

    __eq__ = Packet.__eq__
    __repr__ = Packet.__repr__
    __hash__ = None  # type: ignore[assignment]  # mutable, equal by value: tell mypy unhashable


class Subscribe(Packet):
    __slots__ = ("packet_id", "properties", "subscriptions")
    type = P.SUBSCRIBE

    def __init__(
        self,
        packet_id: int,
        subscriptions: list[Subscription],
        properties: dict[str, Any] | None = None,
    ) -> None:
        self.packet_id = packet_id
        self.subscriptions = subscriptions
        self.properties = properties if properties is not None else {}


class _CodesAck(Packet):
    """SUBACK and UNSUBACK share one shape: a packet id and a reason code per filter."""

    __slots__ = ("packet_id", "properties", "reason_codes")

    def __init__(
        self, packet_id: int, reason_codes: list[int], properties: dict[str, Any] | None = None
    ) -> None:
        self.packet_id = packet_id
        self.reason_codes = reason_codes
        self.properties = properties if properties is not None else {}


class Suback(_CodesAck):
    __slots__ = ()
    type = P.SUBACK


class Unsubscribe(Packet):
    __slots__ = ("packet_id", "properties", "topic_filters")
    type = P.UNSUBSCRIBE

    def __init__(
        self, packet_id: int, topic_filters: list[str], properties: dict[str, Any] | None = None
    ) -> None:
        self.packet_id = packet_id
        self.topic_filters = topic_filters
        self.properties = properties if properties is not None else {}


class Unsuback(_CodesAck):
    __slots__ = ()
    type = P.UNSUBACK


class Pingreq(Packet):
    __slots__ = ()
    type = P.PINGREQ


class Pingresp(Packet):
    __slots__ = ()
    type = P.PINGRESP


class Disconnect(Packet):
    __slots__ = ("properties", "reason_code")
    type = P.DISCONNECT

    def __init__(self, reason_code: int = 0, properties: dict[str, Any] | None = None) -> None:
        self.reason_code = reason_code
        self.properties = properties if properties is not None else {}


class Auth(Packet):
    __slots__ = ("properties", "reason_code")
    type = P.AUTH

    def __init__(self, reason_code: int = 0, properties: dict[str, Any] | None = None) -> None:
        self.reason_code = reason_code
        self.properties = properties if properties is not None else {}


PACKET_CLASSES: dict[int, type[Packet]] = {
    cls.type: cls
    for cls in (
        Connect, Connack, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe, Suback,
        Unsubscribe, Unsuback, Pingreq, Pingresp, Disconnect, Auth,
    )
}  # fmt: skip
