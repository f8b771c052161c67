"""The one error type the codec raises, carrying an MQTT 5 reason code."""

from __future__ import annotations

from typing import Any

from roost.mqtt.reason_codes import MALFORMED_PACKET


class MQTTError(Exception):
    """Malformed or forbidden input; ``reason_code`` is the MQTT 5 code to report (0x81, ...)."""

    def __init__(self, message: str, reason_code: int = MALFORMED_PACKET) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        #: Packets ``Decoder.feed`` decoded from the same chunk before the bad one.
        self.packets: list[Any] = []

    @property
    def message(self) -> str:
        return str(self.args[0])
