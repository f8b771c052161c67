// Command quicgo is an MQTT-over-QUIC client built on quic-go, an independent QUIC stack, for
// Roost's interop tests (tests/test_quic_interop.py). It speaks what EMQX's QUIC clients speak:
// ALPN "mqtt", the MQTT byte stream on the first client bidirectional stream, more data streams
// after it. One run walks these steps and prints one JSON report on stdout:
//
//	full     a full handshake, CONNECT on the control stream, CONNACK
//	stream   SUBSCRIBE on a data stream, PUBLISH on the control stream, the message back on the
//	         data stream
//	migrate  the client moves to a new address (a new socket, probed, then switched to); both go
//	         through a NAT-like relay that takes the old address away after the switch, so only
//	         the new one can carry what follows
//	zerortt  a new connection resumed with the session ticket, CONNECT and a PUBLISH sent in
//	         0-RTT data
//
// A step that fails records its error and the later steps that need it are not run.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
)

type report struct {
	ALPN            string            `json:"alpn"`
	Resumed         bool              `json:"full_resumed"`
	Connack         int               `json:"connack"`
	Suback          int               `json:"suback"`
	Puback          int               `json:"puback"`
	StreamMessage   string            `json:"stream_message"`
	PathFrom        string            `json:"path_from"`
	PathTo          string            `json:"path_to"`
	MigratedPuback  int               `json:"migrated_puback"`
	MigratedMessage string            `json:"migrated_message"`
	Used0RTT        bool              `json:"zerortt_used"`
	ZeroConnack     int               `json:"zerortt_connack"`
	ZeroPuback      int               `json:"zerortt_puback"`
	ZeroMessage     string            `json:"zerortt_message"`
	Done            []string          `json:"done"`
	Errors          map[string]string `json:"errors"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:14567", "the broker's QUIC listener")
	ca := flag.String("ca", "", "PEM file of the CA that signed the broker's certificate")
	id := flag.String("id", "quicgo", "client id prefix")
	timeout := flag.Duration("timeout", 20*time.Second, "bound on the whole run")
	flag.Parse()

	r := &report{Connack: -1, Suback: -1, Puback: -1, MigratedPuback: -1, ZeroConnack: -1,
		ZeroPuback: -1, Errors: map[string]string{}}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if err := run(ctx, r, *addr, *ca, *id); err != nil {
		r.Errors["setup"] = err.Error()
	}
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
}

func run(ctx context.Context, r *report, addr, caFile, id string) error {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return errors.New("no certificate in " + caFile)
	}
	server, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return err
	}
	tlsConf := &tls.Config{
		RootCAs:            roots,
		ServerName:         "localhost",
		NextProtos:         []string{"mqtt"},
		ClientSessionCache: tls.NewLRUClientSessionCache(4),
	}
	conf := &quic.Config{MaxIdleTimeout: 10 * time.Second}
	step := func(name string, f func() error) bool {
		if err := f(); err != nil {
			r.Errors[name] = err.Error()
			return false
		}
		r.Done = append(r.Done, name)
		return true
	}

	// Both paths go through the relay, which can take the first one's address away.
	relay, err := newRelay(server)
	if err != nil {
		return err
	}
	defer relay.close()
	udp1, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return err
	}
	tr1 := &quic.Transport{Conn: udp1}
	defer tr1.Close()

	var conn *quic.Conn
	var ctl, data *mqttStream
	if !step("full", func() error {
		conn, err = tr1.Dial(ctx, relay.addr(), tlsConf, conf)
		if err != nil {
			return err
		}
		st := conn.ConnectionState()
		r.ALPN, r.Resumed = st.TLS.NegotiatedProtocol, st.TLS.DidResume
		if ctl, err = openStream(ctx, conn); err != nil {
			return err
		}
		r.Connack, err = ctl.connect(id + "-1")
		return err
	}) {
		return nil
	}
	defer conn.CloseWithError(0, "")
	if !step("stream", func() error {
		if data, err = openStream(ctx, conn); err != nil {
			return err
		}
		if r.Suback, err = data.subscribe(1, "interop/quicgo", 1); err != nil {
			return err
		}
		if r.Puback, err = ctl.publish(1, "interop/quicgo", "on the data stream"); err != nil {
			return err
		}
		r.StreamMessage, err = data.receive()
		return err
	}) {
		return nil
	}
	step("migrate", func() error {
		udp2, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return err
		}
		tr2 := &quic.Transport{Conn: udp2}
		path, err := conn.AddPath(tr2)
		if err != nil {
			return err
		}
		pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
		defer pcancel()
		if err := path.Probe(pctx); err != nil {
			return fmt.Errorf("probe: %w", err)
		}
		if err := path.Switch(); err != nil {
			return fmt.Errorf("switch: %w", err)
		}
		r.PathFrom, r.PathTo = relay.seen(udp1.LocalAddr()), relay.seen(udp2.LocalAddr())
		relay.cut(udp1.LocalAddr()) // the old address is gone for good
		if r.MigratedPuback, err = ctl.publish(2, "interop/quicgo", "after the move"); err != nil {
			return err
		}
		r.MigratedMessage, err = data.receive()
		return err
	})
	ctl.disconnect()
	conn.CloseWithError(0, "")

	step("zerortt", func() error {
		early, err := quic.DialAddrEarly(ctx, addr, tlsConf, conf)
		if err != nil {
			return err
		}
		defer early.CloseWithError(0, "")
		// Everything up to the CONNACK goes out before the handshake completes: 0-RTT data.
		zctl, err := openStream(ctx, early)
		if err != nil {
			return err
		}
		if err := zctl.write(connectPacket(id + "-2")); err != nil {
			return err
		}
		if err := zctl.write(subscribePacket(1, "interop/quicgo/0rtt", 1)); err != nil {
			return err
		}
		if err := zctl.write(publishPacket(1, "interop/quicgo/0rtt", "in early data")); err != nil {
			return err
		}
		if r.ZeroConnack, err = zctl.connack(); err != nil {
			return err
		}
		if _, err := zctl.suback(1); err != nil {
			return err
		}
		// The broker sends the message back (to our own subscription) and acknowledges it.
		for r.ZeroPuback < 0 || r.ZeroMessage == "" {
			kind, body, err := zctl.read()
			if err != nil {
				return err
			}
			switch kind {
			case 4:
				r.ZeroPuback = reasonOf(body)
			case 3:
				r.ZeroMessage, err = zctl.ackPublish(body)
				if err != nil {
					return err
				}
			default:
				return fmt.Errorf("unexpected packet type %d", kind)
			}
		}
		select {
		case <-early.HandshakeComplete():
		case <-ctx.Done():
			return ctx.Err()
		}
		r.Used0RTT = early.ConnectionState().Used0RTT
		zctl.disconnect()
		return nil
	})
	return nil
}

// relay stands between the client and the server like a NAT: each client address gets its own
// socket towards the server, so the server sees a different address per client path, and cut
// takes one path's address away for good.
type relay struct {
	front  *net.UDPConn
	server *net.UDPAddr
	mu     sync.Mutex
	backs  map[string]*net.UDPConn
	cuts   map[string]bool
}

func newRelay(server *net.UDPAddr) (*relay, error) {
	front, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	rl := &relay{front: front, server: server, backs: map[string]*net.UDPConn{}, cuts: map[string]bool{}}
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := front.ReadFromUDP(buf)
			if err != nil {
				return
			}
			if back := rl.back(from); back != nil {
				back.Write(buf[:n])
			}
		}
	}()
	return rl, nil
}

// back is the socket towards the server for one client address, made on its first datagram.
func (rl *relay) back(client *net.UDPAddr) *net.UDPConn {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	key := client.String()
	if rl.cuts[key] {
		return nil
	}
	if b := rl.backs[key]; b != nil {
		return b
	}
	b, err := net.DialUDP("udp", nil, rl.server)
	if err != nil {
		return nil
	}
	rl.backs[key] = b
	go func() {
		buf := make([]byte, 65536)
		for {
			n, err := b.Read(buf)
			if err != nil {
				return
			}
			rl.front.WriteToUDP(buf[:n], client)
		}
	}()
	return b
}

// seen is the address the server sees for a client address.
func (rl *relay) seen(client net.Addr) string {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if b := rl.backs[client.String()]; b != nil {
		return b.LocalAddr().String()
	}
	return ""
}

func (rl *relay) cut(client net.Addr) {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	key := client.String()
	rl.cuts[key] = true
	if b := rl.backs[key]; b != nil {
		b.Close()
		delete(rl.backs, key)
	}
}

func (rl *relay) addr() *net.UDPAddr { return rl.front.LocalAddr().(*net.UDPAddr) }

func (rl *relay) close() {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	rl.front.Close()
	for _, b := range rl.backs {
		b.Close()
	}
}

// mqttStream is one QUIC stream carrying MQTT 5 packets.
type mqttStream struct{ s *quic.Stream }

func openStream(ctx context.Context, c *quic.Conn) (*mqttStream, error) {
	s, err := c.OpenStreamSync(ctx)
	if err != nil {
		return nil, err
	}
	s.SetDeadline(time.Now().Add(10 * time.Second))
	return &mqttStream{s}, nil
}

func (m *mqttStream) write(p []byte) error { _, err := m.s.Write(p); return err }

// read returns the next packet's type and its body (after the fixed header).
func (m *mqttStream) read() (byte, []byte, error) {
	var b [1]byte
	if _, err := io.ReadFull(m.s, b[:]); err != nil {
		return 0, nil, err
	}
	kind := b[0] >> 4
	n, mul := 0, 1
	for i := 0; ; i++ {
		var d [1]byte
		if _, err := io.ReadFull(m.s, d[:]); err != nil {
			return 0, nil, err
		}
		n += int(d[0]&0x7f) * mul
		if d[0]&0x80 == 0 {
			break
		}
		if i == 3 {
			return 0, nil, errors.New("malformed remaining length")
		}
		mul *= 128
	}
	body := make([]byte, n)
	_, err := io.ReadFull(m.s, body)
	return kind, body, err
}

func (m *mqttStream) expect(kind byte) ([]byte, error) {
	k, body, err := m.read()
	if err != nil {
		return nil, err
	}
	if k != kind {
		return nil, fmt.Errorf("expected packet type %d, got %d", kind, k)
	}
	return body, nil
}

func (m *mqttStream) connect(clientID string) (int, error) {
	if err := m.write(connectPacket(clientID)); err != nil {
		return -1, err
	}
	return m.connack()
}

func (m *mqttStream) connack() (int, error) {
	body, err := m.expect(2)
	if err != nil {
		return -1, err
	}
	if len(body) < 2 {
		return -1, errors.New("short CONNACK")
	}
	return int(body[1]), nil
}

func (m *mqttStream) subscribe(pid uint16, filter string, qos byte) (int, error) {
	if err := m.write(subscribePacket(pid, filter, qos)); err != nil {
		return -1, err
	}
	return m.suback(pid)
}

func (m *mqttStream) suback(pid uint16) (int, error) {
	body, err := m.expect(9)
	if err != nil {
		return -1, err
	}
	// packet id, properties (a varint length, empty from Roost unless it says why), reason codes
	if len(body) < 4 || uint16(body[0])<<8|uint16(body[1]) != pid {
		return -1, errors.New("SUBACK for another packet id")
	}
	props, used := varint(body[2:])
	return int(body[2+used+props]), nil
}

func (m *mqttStream) publish(pid uint16, topic, payload string) (int, error) {
	if err := m.write(publishPacket(pid, topic, payload)); err != nil {
		return -1, err
	}
	body, err := m.expect(4)
	if err != nil {
		return -1, err
	}
	return reasonOf(body), nil
}

// receive reads one QoS 1 PUBLISH, acknowledges it and returns its payload.
func (m *mqttStream) receive() (string, error) {
	body, err := m.expect(3)
	if err != nil {
		return "", err
	}
	return m.ackPublish(body)
}

func (m *mqttStream) ackPublish(body []byte) (string, error) {
	tlen := int(body[0])<<8 | int(body[1])
	rest := body[2+tlen:]
	pid := rest[:2]
	props, used := varint(rest[2:])
	payload := string(rest[2+used+props:])
	return payload, m.write([]byte{0x40, 2, pid[0], pid[1]})
}

func (m *mqttStream) disconnect() { m.write([]byte{0xe0, 0}) }

// reasonOf is a PUBACK's reason code: absent (body of 2 bytes) means success.
func reasonOf(body []byte) int {
	if len(body) < 3 {
		return 0
	}
	return int(body[2])
}

func varint(b []byte) (value, used int) {
	mul := 1
	for i, d := range b {
		value += int(d&0x7f) * mul
		if d&0x80 == 0 {
			return value, i + 1
		}
		mul *= 128
	}
	return value, len(b)
}

func str(s string) []byte { return append([]byte{byte(len(s) >> 8), byte(len(s))}, s...) }

func packet(header byte, body []byte) []byte {
	out := []byte{header}
	n := len(body)
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		out = append(out, d)
		if n == 0 {
			break
		}
	}
	return append(out, body...)
}

func connectPacket(clientID string) []byte {
	body := str("MQTT")
	body = append(body, 5, 0x02, 0, 30, 0) // MQTT 5, clean start, keepalive 30 s, no properties
	return packet(0x10, append(body, str(clientID)...))
}

func subscribePacket(pid uint16, filter string, qos byte) []byte {
	body := []byte{byte(pid >> 8), byte(pid), 0}
	body = append(append(body, str(filter)...), qos)
	return packet(0x82, body)
}

func publishPacket(pid uint16, topic, payload string) []byte {
	body := append(str(topic), byte(pid>>8), byte(pid), 0)
	return packet(0x32, append(body, payload...))
}
