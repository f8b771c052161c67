"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): log in, see the
rate chart, see a client the test connected, kick it and see it gone; use the WebSocket client
page to publish and subscribe through the broker."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from collections.abc import Iterator

import pytest
from aiohttp import WSMsgType, web

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


class WsBridge:
    """MQTT over WebSocket -> the broker's TCP listener, for when this build has no WS listener."""

    def __init__(self, mqtt_port: int) -> None:
        self.mqtt_port = mqtt_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("mqtt",))
        await ws.prepare(request)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.mqtt_port)

        async def down() -> None:
            while data := await reader.read(65536):
                await ws.send_bytes(data)
            await ws.close()

        task = asyncio.create_task(down())
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                writer.write(msg.data)
        writer.close()
        task.cancel()
        return ws

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/mqtt", self._handler)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> WsBridge:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        with contextlib.suppress(Exception):
            fut.result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


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
        ws_running = next(x for x in listeners if x["id"] == "ws:default")["running"]
        with contextlib.ExitStack() as stack:
            if not ws_running:  # no WS transport in this build yet: bridge to the TCP listener
                bridge = stack.enter_context(WsBridge(b.port))
                page.fill("#ws-url", f"ws://127.0.0.1:{bridge.port}/mqtt")
            page.fill("#ws-clientid", "browser-ws")
            page.click("#ws-connect-btn")
            page.wait_for_selector("#ws-state:text-is('connected')")
            assert api.ok("GET", "/api/v1/clients/browser-ws")["connected"]
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
