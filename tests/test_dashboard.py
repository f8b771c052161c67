"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): log in, see the
rate chart, see a client the test connected, kick it and see it gone; use the WebSocket client
page to publish and subscribe through the broker."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.brokerproc import BrokerProcess, free_port
from tests.clients import PahoClient
from tests.http import Api

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_dashboard_login_overview_kick_and_websocket_client(browser):
    ws_port = free_port()
    cfg = {
        "listeners": {"ws": {"default": {"enabled": True, "bind": f"127.0.0.1:{ws_port}"}}},
        "sys_topics": {"enabled": False},
    }
    with BrokerProcess(cfg) as b:
        b.wait_api()
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.set_default_timeout(10_000)
        page.goto(b.api_url + "/")  # redirects to /dashboard/
        page.wait_for_selector("#login:not([hidden])")
        page.fill("#login-pass", "wrong")
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#login-error:has-text('wrong')")
        page.fill("#login-pass", "test-pass")
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#login", state="hidden")
        page.wait_for_selector(".card:has-text('Connections')")
        page.wait_for_function("Number(document.querySelector('#rate-chart').dataset.samples) >= 1")
        nodes = page.inner_text("#nodes-table tbody")
        assert "roost@127.0.0.1" in nodes and "core" in nodes

        victim = PahoClient(b.port, "browser-victim")
        victim.connect(username="eve")
        bystander = PahoClient(b.port, "browser-bystander")
        bystander.connect()
        page.click("#nav a[href='#clients']")
        row = page.locator("#clients-table tbody tr", has_text="browser-victim")
        row.wait_for()
        assert "eve" in row.inner_text()
        page.fill("#client-search", "victim")
        page.wait_for_function("document.querySelectorAll('#clients-table tbody tr').length === 1")
        row.get_by_role("button", name="Kick").click()
        row.wait_for(state="detached")
        assert victim.disconnects.get(timeout=5).value == 0x98
        victim.c.loop_stop()
        api = Api(b.api_url, key=b.api_key)
        assert api.get("/api/v1/clients/browser-victim")[0] == 404
        assert api.get("/api/v1/clients/browser-bystander")[0] == 200

        # The WebSocket client page: its URL comes from config listeners.ws.
        page.click("#nav a[href='#websocket']")
        page.wait_for_function("document.querySelector('#ws-url').value !== ''")
        assert page.input_value("#ws-url") == f"ws://127.0.0.1:{ws_port}/mqtt"
        listeners = api.ok("GET", "/api/v1/listeners")["data"]
        assert next(x for x in listeners if x["id"] == "ws:default")["running"]
        # The broker's own WebSocket listener (listeners.ws), from the page's MQTT client.
        page.fill("#ws-clientid", "browser-ws")
        page.click("#ws-connect-btn")
        page.wait_for_selector("#ws-state:text-is('connected')")
        ws_client = api.ok("GET", "/api/v1/clients/browser-ws")
        assert ws_client["connected"] and ws_client["listener"] == "ws:default"
        page.fill("#ws-sub-topic", "dash/#")
        page.click("#ws-sub button")
        page.wait_for_selector("#ws-messages td:has-text('granted QoS 0')")
        bystander.publish("dash/in", b"from paho", 1)
        page.wait_for_selector("#ws-messages td:has-text('from paho')")
        bystander.subscribe("dash/out", 0)
        page.fill("#ws-pub-topic", "dash/out")
        page.fill("#ws-pub-payload", "from the browser")
        page.click("#ws-pub button")
        m = bystander.recv()
        assert m.topic == "dash/out" and m.payload == b"from the browser"
        page.click("#ws-disconnect-btn")
        page.wait_for_selector("#ws-state:text-is('disconnected')")
        # The other pages show what the broker holds.
        api.ok(
            "POST", "/api/v1/publish", {"topic": "dash/kept", "payload": "kept!", "retain": True}
        )
        page.click("#nav a[href='#subscriptions']")
        page.locator("#subs-table tbody tr", has_text="dash/out").wait_for()
        page.click("#nav a[href='#topics']")
        page.locator("#topics-table tbody tr", has_text="dash/out").wait_for()
        page.click("#nav a[href='#retained']")
        kept = page.locator("#retained-table tbody tr", has_text="dash/kept")
        kept.get_by_role("link").click()
        page.wait_for_selector("#retained-payload:text-is('kept!')")
        kept.get_by_role("button", name="Delete").click()
        kept.wait_for(state="detached")
        assert api.get("/api/v1/retained/dash/kept")[0] == 404
        page.click("#nav a[href='#listeners']")
        tcp = page.locator("#listeners-table tbody tr", has_text="tcp:default")
        tcp.wait_for()
        assert "running" in tcp.inner_text()
        page.click("#nav a[href='#overview']")
        page.wait_for_selector(".card:has-text('Connections')")
        page.screenshot(path=str(b.config_path.parent / "overview.png"))
        bystander.disconnect()
        page.close()
        assert not errors, errors
