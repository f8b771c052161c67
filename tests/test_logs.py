"""Structured logs: one JSON object a line or plain text, with levels per module from config
(and changed at run time through the config API)."""

from __future__ import annotations

import io
import json
import logging
import re

from roost.config import LogSettings
from roost.logs import JsonFormatter, setup_logging
from tests.brokerproc import BrokerProcess
from tests.clients import RawClient
from tests.http import Api, wait_for


def test_json_lines_with_per_module_levels():
    cfg = {"log": {"format": "json", "level": "warning", "levels": {"roost.mgmt": "info"}}}
    with BrokerProcess(cfg) as b:
        b.wait_api()
        lines = [ln for ln in b.log().splitlines() if ln.strip()]
        entries = [json.loads(ln) for ln in lines]  # every line is one JSON object
        assert all({"time", "level", "logger", "msg"} <= set(e) for e in entries)
        assert all(
            re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in entries
        )
        loggers = {e["logger"] for e in entries}
        assert "roost.mgmt" in loggers  # info allowed for this module
        assert not any(e["logger"] == "roost" and e["level"] == "info" for e in entries)
        # Levels change at run time through the config API.
        api = Api(b.api_url, key=b.api_key)
        cfg_now = api.ok("GET", "/api/v1/config")
        cfg_now["log"]["levels"] = {"roost.channel": "debug"}
        api.ok("PUT", "/api/v1/config", cfg_now)
        raw = RawClient(b.port)
        assert raw.connect("log-me").reason_code == 0
        raw.close()

        def connected_logged():
            for ln in b.log().splitlines():
                e = json.loads(ln)
                if e["logger"] == "roost.channel" and "log-me" in e["msg"]:
                    return e
            return None

        e = wait_for(connected_logged, what="debug line of roost.channel")
        assert e["level"] == "debug"


def test_text_format_for_a_terminal():
    with BrokerProcess({"log": {"format": "text"}}) as b:
        b.wait_api()
        first = b.log().splitlines()[0]
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO roost\S*: ", first), first


def test_json_formatter_keeps_exceptions_and_extra_fields():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("roost.test.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            log.error("failed %s", "here", exc_info=True, extra={"clientid": "c1"})
    finally:
        log.removeHandler(handler)
    e = json.loads(stream.getvalue())
    assert e["msg"] == "failed here" and e["level"] == "error"
    assert "ValueError: boom" in e["exc"] and e["clientid"] == "c1"


def test_setup_logging_sets_root_and_module_levels():
    setup_logging(LogSettings(level="error", levels={"roost.x": "debug"}))
    try:
        assert logging.getLogger().level == logging.ERROR
        assert logging.getLogger("roost.x").level == logging.DEBUG
        setup_logging(LogSettings(level="info"))  # a later config drops the module override
        assert logging.getLogger("roost.x").level == logging.NOTSET
    finally:
        setup_logging(LogSettings())
