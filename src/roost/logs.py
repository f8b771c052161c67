"""Logging: plain text for a terminal or one JSON object per line, levels per module.

``setup_logging`` may run again when the config changes at run time: module levels set by an
earlier call and absent from the new settings go back to inheriting the root level.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from roost.config import LogSettings

# Attributes every LogRecord has; anything else came in through ``extra=`` and is logged too.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_module_levels: set[str] = set()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                ok = isinstance(value, str | int | float | bool) or value is None
                entry[key] = value if ok else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(settings: LogSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    for module in _module_levels - set(settings.levels):
        logging.getLogger(module).setLevel(logging.NOTSET)
    _module_levels.clear()
    for module, level in settings.levels.items():
        logging.getLogger(module).setLevel(level.upper())
        _module_levels.add(module)
