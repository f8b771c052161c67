// Roost dashboard: plain JS over the REST API (/api/v1), no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { auth: sessionStorage.getItem("roost-auth"), timer: null, rates: [], last: null };

// -- API -------------------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = { Authorization: state.auth || "" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch("/api/v1" + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401) { showLogin(); throw new Error("unauthorized"); }
  if (r.status === 204) return null;
  const data = await r.json();
  if (!r.ok) throw new Error(data.message || r.statusText);
  return data;
}

function showLogin(message) {
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#login-pass").focus();
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const user = $("#login-user").value, pass = $("#login-pass").value;
  state.auth = user === "key" ? "Bearer " + pass : "Basic " + btoa(user + ":" + pass);
  const r = await fetch("/api/v1/node", { headers: { Authorization: state.auth } });
  if (!r.ok) {
    state.auth = null;
    showLogin(r.status === 429 ? "too many failed logins from here: wait, then retry"
      : "wrong user or password");
    return;
  }
  sessionStorage.setItem("roost-auth", state.auth);
  $("#login").hidden = true;
  $("#who").textContent = user === "key" ? "API key" : user;
  route();
});

$("#logout").addEventListener("click", () => {
  sessionStorage.removeItem("roost-auth");
  state.auth = null;
  showLogin();
});

// -- helpers ---------------------------------------------------------------------------------

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  return td;
}

function fillTable(sel, rows, render) {
  const tbody = $(sel + " tbody");
  tbody.replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    render(row).forEach((c) => tr.appendChild(c instanceof Node ? c : cell(c)));
    return tr;
  }));
}

function button(label, onclick, cls) {
  const td = document.createElement("td");
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (cls) b.className = cls;
  b.addEventListener("click", onclick);
  td.appendChild(b);
  return td;
}

const enc = encodeURIComponent;

// -- pages -----------------------------------------------------------------------------------

async function overview() {
  const [stats, nodes] = await Promise.all([api("GET", "/stats"), api("GET", "/cluster/nodes")]);
  const cards = [["Connections", stats.connections], ["Sessions", stats.sessions],
    ["Subscriptions", stats.subscriptions], ["Topics", stats.topics],
    ["Retained", stats.retained], ["Nodes", nodes.nodes.length]];
  $("#cards").replaceChildren(...cards.map(([k, v]) => {
    const d = document.createElement("div");
    d.className = "card";
    d.innerHTML = "<b></b><span></span>";
    d.querySelector("b").textContent = v;
    d.querySelector("span").textContent = k;
    return d;
  }));
  fillTable("#nodes-table", nodes.nodes, (n) =>
    [n.name, n.role, n.version, n.status, n.connections, Math.round(n.uptime || 0)]);
  const c = stats.counters;
  if (state.last) {
    const dt = Math.max(0.001, stats.time - state.last.time);
    state.rates.push([(c.messages_received - state.last.in) / dt,
                      (c.messages_sent - state.last.out) / dt]);
    if (state.rates.length > 90) state.rates.shift();
  }
  state.last = { time: stats.time, in: c.messages_received, out: c.messages_sent };
  drawChart($("#rate-chart"), state.rates);
}

function drawChart(canvas, points) {
  // A line chart drawn by hand: two series, y from 0 to a rounded maximum, 90 samples wide.
  const g = canvas.getContext("2d"), w = canvas.width, h = canvas.height, pad = 36;
  g.clearRect(0, 0, w, h);
  let max = 1;
  for (const [a, b] of points) max = Math.max(max, a, b);
  const mag = Math.pow(10, Math.floor(Math.log10(max)));
  max = Math.ceil(max / mag) * mag;
  g.strokeStyle = "#e3e6ec";
  g.fillStyle = "#6b7385";
  g.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = h - pad + (-(h - 2 * pad) * i) / 4;
    g.beginPath(); g.moveTo(pad, y); g.lineTo(w - 8, y); g.stroke();
    g.fillText(String(+(max * i / 4).toFixed(1)), 4, y + 4);
  }
  const x = (i) => pad + ((w - pad - 8) * i) / 89;
  const y = (v) => h - pad - ((h - 2 * pad) * v) / max;
  // Sent is dashed so that equal rates (one publisher, one subscriber) show both lines.
  [["#1f9d55", 1, [6, 4]], ["#2f6fdf", 0, []]].forEach(([color, k, dash]) => {
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.setLineDash(dash);
    g.beginPath();
    points.forEach((p, i) => (i ? g.lineTo(x(i), y(p[k])) : g.moveTo(x(i), y(p[k]))));
    g.stroke();
  });
  g.setLineDash([]);
  canvas.dataset.samples = String(points.length);
}

async function clients() {
  const term = $("#client-search").value.trim();
  const q = term ? "&like_clientid=" + enc(term) : "";
  const page = await api("GET", "/clients?limit=500" + q);
  fillTable("#clients-table", page.data, (c) => [
    c.clientid, c.username, c.ip_address ? c.ip_address + ":" + c.port : "", c.listener,
    c.proto_ver, c.connected ? "connected" : "offline", c.subscriptions_cnt, c.mqueue_len,
    button("Kick", async () => {
      await api("DELETE", "/clients/" + enc(c.clientid));
      await clients();
    }, "danger"),
  ]);
  $("#clients-table").dataset.loaded = String(Date.now());
}

async function subscriptions() {
  const term = $("#sub-search").value.trim();
  const page = await api("GET", "/subscriptions?limit=500" + (term ? "&clientid=" + enc(term) : ""));
  fillTable("#subs-table", page.data, (s) => [s.clientid, s.topic, s.qos, s.nl, s.rap]);
}

async function topics() {
  const page = await api("GET", "/topics?limit=500");
  fillTable("#topics-table", page.data, (t) =>
    [t.topic, t.subscribers, Object.entries(t.shared_groups).map(([g, n]) => g + " (" + n + ")").join(", ")]);
}

async function retained() {
  const page = await api("GET", "/retained?limit=500");
  fillTable("#retained-table", page.data, (m) => {
    const link = document.createElement("td");
    const a = document.createElement("a");
    a.href = "#retained";
    a.textContent = m.topic;
    a.addEventListener("click", async (ev) => {
      ev.preventDefault();
      const full = await api("GET", "/retained/" + enc(m.topic));
      $("#retained-payload").textContent = full.payload_text ?? ("base64: " + full.payload);
    });
    link.appendChild(a);
    return [link, m.qos, m.payload_size, m.from_clientid,
      button("Delete", async () => { await api("DELETE", "/retained/" + enc(m.topic)); await retained(); }, "danger")];
  });
}

async function listeners() {
  const data = (await api("GET", "/listeners")).data;
  fillTable("#listeners-table", data, (l) => [l.id, l.bind, l.status, l.connections, l.max_connections,
    button(l.enabled ? "Disable" : "Enable", async () => {
      await api("POST", "/listeners/" + enc(l.id) + (l.enabled ? "/disable" : "/enable"));
      await listeners();
    })]);
}

// -- websocket client ------------------------------------------------------------------------

let wsClient = null;

async function websocket() {
  if (!$("#ws-url").value) {
    const ws = (await api("GET", "/listeners")).data.find((l) => l.type === "ws" && l.enabled);
    if (ws) {
      const port = ws.bind.split(":").pop();
      $("#ws-url").value = "ws://" + location.hostname + ":" + port + (ws.path || "/mqtt");
    }
  }
  if (!$("#ws-clientid").value) $("#ws-clientid").value = "dashboard-" + Math.random().toString(16).slice(2, 8);
}

function wsLog(topic, payload) {
  const tr = document.createElement("tr");
  [new Date().toLocaleTimeString(), topic, payload].forEach((t) => tr.appendChild(cell(t)));
  $("#ws-messages tbody").prepend(tr);
}

$("#ws-connect").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const client = new MqttWs($("#ws-url").value, $("#ws-clientid").value);
  client.onmessage = (topic, payload) => wsLog(topic, payload);
  client.onclose = () => {
    $("#ws-state").textContent = "disconnected";
    $("#ws-connect-btn").disabled = false;
    $("#ws-disconnect-btn").disabled = true;
  };
  $("#ws-state").textContent = "connecting";
  try {
    await client.connect();
    wsClient = client;
    $("#ws-state").textContent = "connected";
    $("#ws-connect-btn").disabled = true;
    $("#ws-disconnect-btn").disabled = false;
  } catch (e) {
    $("#ws-state").textContent = "error: " + e.message;
  }
});

$("#ws-disconnect-btn").addEventListener("click", () => wsClient && wsClient.disconnect());

$("#ws-sub").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!wsClient) return;
  const code = await wsClient.subscribe($("#ws-sub-topic").value);
  wsLog("(subscribed " + $("#ws-sub-topic").value + ")", code === 128 ? "refused" : "granted QoS " + code);
});

$("#ws-pub").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (wsClient) wsClient.publish($("#ws-pub-topic").value, $("#ws-pub-payload").value, $("#ws-pub-retain").checked);
});

// -- routing ---------------------------------------------------------------------------------

const pages = { overview, clients, subscriptions, topics, retained, listeners, websocket };
const polled = new Set(["overview", "clients", "subscriptions", "topics", "listeners"]);

function route() {
  const name = (location.hash || "#overview").slice(1);
  const page = pages[name] ? name : "overview";
  document.querySelectorAll(".page").forEach((s) => s.classList.toggle("active", s.id === "page-" + page));
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.hash === "#" + page));
  clearInterval(state.timer);
  if (!state.auth) { showLogin(); return; }
  const run = () => pages[page]().catch((e) => console.warn(page, e.message));
  run();
  if (polled.has(page)) state.timer = setInterval(run, page === "overview" ? 2000 : 3000);
}

$("#client-search").addEventListener("input", () => clients().catch(() => {}));
$("#sub-search").addEventListener("input", () => subscriptions().catch(() => {}));
window.addEventListener("hashchange", route);
route();
