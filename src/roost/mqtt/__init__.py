"""Sans-IO MQTT 3.1, 3.1.1 and 5.0 codec: no sockets, no asyncio, no broker."""

from roost.mqtt.codec import Decoder, encode, encode_publish
from roost.mqtt.errors import MQTTError
from roost.mqtt.packets import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
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

__all__ = [
    "MQTT_3_1", "MQTT_3_1_1", "MQTT_5", "Auth", "Connack", "Connect", "Decoder", "Disconnect",
    "MQTTError", "Packet", "Pingreq", "Pingresp", "Puback", "Pubcomp", "Publish", "Pubrec",
    "Pubrel", "Suback", "Subscribe", "Subscription", "Unsuback", "Unsubscribe", "Will", "encode",
    "encode_publish",
]  # fmt: skip
