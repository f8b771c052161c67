// A small MQTT 3.1.1 client over WebSocket for the dashboard's "WebSocket client" page:
// CONNECT, SUBSCRIBE, PUBLISH (QoS 0 out, QoS 0/1 in), PINGREQ, DISCONNECT.
"use strict";

class MqttWs {
  constructor(url, clientId, keepalive = 60) {
    this.url = url;
    this.clientId = clientId;
    this.keepalive = keepalive;
    this.buf = new Uint8Array(0);
    this.nextId = 1;
    this.waiting = new Map(); // packet id -> resolve (SUBACK)
    this.onmessage = () => {};
    this.onclose = () => {};
  }

  static str(s) {
    const b = new TextEncoder().encode(s);
    return [b.length >> 8, b.length & 255, ...b];
  }

  static packet(first, body) {
    const len = [];
    let n = body.length;
    do {
      let d = n % 128;
      n = Math.floor(n / 128);
      if (n > 0) d |= 128;
      len.push(d);
    } while (n > 0);
    return new Uint8Array([first, ...len, ...body]);
  }

  connect() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url, ["mqtt"]);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      this.connack = { resolve, reject };
      ws.onopen = () => {
        const vh = [...MqttWs.str("MQTT"), 4, 0x02, this.keepalive >> 8, this.keepalive & 255];
        ws.send(MqttWs.packet(0x10, [...vh, ...MqttWs.str(this.clientId)]));
      };
      ws.onmessage = (ev) => this.feed(new Uint8Array(ev.data));
      ws.onerror = () => reject(new Error("websocket error"));
      ws.onclose = () => {
        clearInterval(this.pinger);
        reject(new Error("closed"));
        this.onclose();
      };
    });
  }

  feed(data) {
    const all = new Uint8Array(this.buf.length + data.length);
    all.set(this.buf);
    all.set(data, this.buf.length);
    let pos = 0;
    while (true) {
      let mult = 1, len = 0, i = pos + 1, d;
      do {
        if (i >= all.length) { this.buf = all.slice(pos); return; }
        d = all[i++];
        len += (d & 127) * mult;
        mult *= 128;
      } while (d & 128);
      if (i + len > all.length) { this.buf = all.slice(pos); return; }
      this.handle(all[pos], all.subarray(i, i + len));
      pos = i + len;
    }
  }

  handle(first, body) {
    const type = first >> 4;
    if (type === 2) {
      if (body[1] === 0) {
        this.pinger = setInterval(() => this.ws.send(new Uint8Array([0xc0, 0])),
                                  this.keepalive * 500);
        this.connack.resolve();
      } else {
        this.connack.reject(new Error("refused, return code " + body[1]));
      }
    } else if (type === 3) {
      const qos = (first >> 1) & 3;
      const tlen = (body[0] << 8) | body[1];
      const topic = new TextDecoder().decode(body.subarray(2, 2 + tlen));
      let p = 2 + tlen;
      if (qos > 0) {
        const pid = [body[p], body[p + 1]];
        p += 2;
        this.ws.send(new Uint8Array([qos === 1 ? 0x40 : 0x50, 2, ...pid]));
      }
      this.onmessage(topic, new TextDecoder().decode(body.subarray(p)), (first & 1) === 1);
    } else if (type === 9) {
      const pid = (body[0] << 8) | body[1];
      const done = this.waiting.get(pid);
      this.waiting.delete(pid);
      if (done) done(body[2]);
    } else if (type === 6) { // PUBREL for a QoS 2 message: complete it
      this.ws.send(new Uint8Array([0x70, 2, body[0], body[1]]));
    }
  }

  subscribe(filter, qos = 0) {
    const pid = this.nextId++ % 65535 || this.nextId++;
    return new Promise((resolve) => {
      this.waiting.set(pid, resolve);
      this.ws.send(MqttWs.packet(0x82, [pid >> 8, pid & 255, ...MqttWs.str(filter), qos]));
    });
  }

  publish(topic, payload, retain = false) {
    const body = [...MqttWs.str(topic), ...new TextEncoder().encode(payload)];
    this.ws.send(MqttWs.packet(0x30 | (retain ? 1 : 0), body));
  }

  disconnect() {
    clearInterval(this.pinger);
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(new Uint8Array([0xe0, 0]));
      this.ws.close();
    }
  }
}
