// MQTT.js over WebSocket for the Python tests. Usage:
//   node pubsub.js <url> <mode: loop|sub> <topic> <count> <qos> [protocolVersion]
// loop: subscribe to <topic>/#, publish <count> messages (sizes up to 200 kB) to itself, check them.
// sub:  subscribe to <topic>, print READY, then one JSON line per message until <count> arrived.
// Prints one JSON line per event; exits 0 after a clean end, 1 on any error or after 20 s.
"use strict";
const mqtt = require("mqtt");

const [url, mode, topic, countS, qosS, versionS] = process.argv.slice(2);
const count = Number(countS);
const qos = Number(qosS);
const protocolVersion = Number(versionS || 5);
const out = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const fail = (why) => { out({ error: String(why) }); process.exit(1); };
setTimeout(() => fail("timeout"), 20000).unref();

const client = mqtt.connect(url, {
  protocolVersion,
  clientId: `js-${mode}-${process.pid}`,
  rejectUnauthorized: false,
  reconnectPeriod: 0,
  connectTimeout: 5000,
});
client.on("error", fail);
client.on("connect", (connack) => {
  out({ event: "connack", sessionPresent: connack.sessionPresent });
  const filter = mode === "loop" ? `${topic}/#` : topic;
  client.subscribe(filter, { qos }, (err, granted) => {
    if (err) return fail(err);
    out({ event: "suback", qos: granted[0].qos });
    if (mode === "sub") return out({ event: "READY" });
    for (let i = 0; i < count; i++) {
      // Every 5th message is large, so it spans many TCP segments and WebSocket reads.
      const size = i % 5 === 4 ? 200000 : 10 + i;
      client.publish(`${topic}/${i}`, Buffer.alloc(size, i % 256), { qos });
    }
  });
});
let received = 0;
client.on("message", (t, payload, packet) => {
  received += 1;
  out({ event: "message", topic: t, size: payload.length, qos: packet.qos,
        text: payload.length < 100 ? payload.toString() : "" });
  if (received === count) client.end(false, {}, () => { out({ event: "end" }); process.exit(0); });
});
