"""Packet equality is the oracle of every codec test: it must compare every field.

Each case draws a packet, then changes one field at a time; the copy must compare unequal.
The fields are found here from the class hierarchy and the constructor, not from the
codec's own helpers, so a class whose slots live in a base class is still covered.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_strategies import (
    acks,
    auths,
    connacks,
    connects,
    disconnects,
    examples,
    publishes,
    subacks,
    subscribes,
    subscriptions,
    unsubacks,
    unsubscribes,
    wills,
)

from roost.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from roost.mqtt.packets import PACKET_CLASSES

EQ = settings(
    max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# Every class that uses Packet's equality, with a strategy of valid instances (MQTT 5, the
# version in which every field can be set).
STRATEGIES: dict[type, Callable[[], st.SearchStrategy[Any]]] = {
    Connect: lambda: connects(MQTT_5),
    Connack: lambda: connacks(MQTT_5),
    Publish: lambda: publishes(MQTT_5),
    Puback: lambda: acks(Puback, MQTT_5),
    Pubrec: lambda: acks(Pubrec, MQTT_5),
    Pubrel: lambda: acks(Pubrel, MQTT_5),
    Pubcomp: lambda: acks(Pubcomp, MQTT_5),
    Subscribe: lambda: subscribes(MQTT_5),
    Suback: lambda: subacks(MQTT_5),
    Unsubscribe: lambda: unsubscribes(MQTT_5),
    Unsuback: lambda: unsubacks(MQTT_5),
    Pingreq: lambda: st.just(Pingreq()),
    Pingresp: lambda: st.just(Pingresp()),
    Disconnect: lambda: disconnects(MQTT_5),
    Auth: auths,
    Will: lambda: wills(MQTT_5),
    Subscription: lambda: subscriptions(MQTT_5),
}


def fields_of(cls: type) -> list[str]:
    """Every slot of ``cls`` and its bases."""
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return names


def other(value: Any) -> Any:
    """A value of the same kind that differs from ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, bytes):
        return value + b"x"
    if isinstance(value, dict):
        return {**value, "not_a_property": 1}  # equality alone: the key need not be valid
    if isinstance(value, list):
        return [*value, copy.deepcopy(value[0])] if value else [0]
    if isinstance(value, Will):
        return Will(value.topic + "x", value.payload, value.qos, value.retain, value.properties)
    if value is None:
        return 1  # any value at all differs from an absent one
    raise AssertionError(f"no way to change a {type(value).__name__}")


def test_every_packet_class_is_covered() -> None:
    assert set(PACKET_CLASSES.values()) <= set(STRATEGIES)


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
def test_the_fields_are_the_constructor_arguments(cls: type) -> None:
    """What the test mutates is everything a caller can set (so no field escapes it)."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(cls.__init__).parameters.values()  # object's for the pings
    params = {p.name for p in params if p.kind in named} - {"self"}
    assert set(fields_of(cls)) == params


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@EQ
@given(data=st.data())
def test_a_change_to_any_one_field_makes_packets_unequal(cls: type, data: st.DataObject) -> None:
    packet = data.draw(STRATEGIES[cls]())
    assert packet == copy.deepcopy(packet)
    for name in fields_of(cls):
        changed = copy.deepcopy(packet)
        setattr(changed, name, other(getattr(packet, name)))
        assert packet != changed, name
        assert changed != packet, name


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@EQ
@given(data=st.data())
def test_repr_shows_every_field(cls: type, data: st.DataObject) -> None:
    packet = data.draw(STRATEGIES[cls]())
    text = repr(packet)
    assert text.startswith(cls.__name__ + "(")
    for name in fields_of(cls):
        assert f"{name}={getattr(packet, name)!r}" in text, name


def test_the_ack_examples() -> None:
    """The cases that used to compare equal because the ack classes' own slots are empty."""
    assert Puback(1) != Puback(2, 0x80)
    assert Puback(1) != Puback(1, 0x80)
    assert Pubrel(1, 0, {"reason_string": "a"}) != Pubrel(1, 0)
    assert Suback(1, [0]) != Suback(1, [0x80])
    assert Unsuback(1, [0]) != Unsuback(2, [0])
    assert Puback(1) != Pubrec(1)  # same shape, different packet
    assert repr(Puback(3, 0x10)) == "Puback(packet_id=3, properties={}, reason_code=16)"


def test_equal_packets_compare_equal_across_versions() -> None:
    """The 3.1.1 shape of an ack (code 0, no properties) is still equal to itself."""
    assert Puback(5) == Puback(5, 0, {})
    assert Connect("c", MQTT_3_1_1) == Connect("c", MQTT_3_1_1)
