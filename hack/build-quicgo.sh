#!/usr/bin/env bash
# Build the quic-go MQTT-over-QUIC interop client (tests/interop/quicgo, for
# tests/test_quic_interop.py) and print the binary's path. Cached in ~/.cache/roost-tests on the
# hash of its source, so an unchanged client costs a hash; a cold build fetches quic-go from the
# Go module proxy (pinned by go.sum) and takes about 30 s. Go: the one on PATH, else the
# toolchain hack/go-toolchain.sh fetches.
set -euo pipefail
cd "$(dirname "$0")/.."
src=tests/interop/quicgo
hash="$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)"
out="${ROOST_TEST_CACHE:-$HOME/.cache/roost-tests}/quicgo/$hash/quicgo"
if [ ! -x "$out" ]; then
  PATH="$(bash hack/go-toolchain.sh):$PATH"
  mkdir -p "$(dirname "$out")"
  (cd "$src" && GOFLAGS=-mod=readonly CGO_ENABLED=0 go build -trimpath -o "$out.tmp" .) >&2
  mv "$out.tmp" "$out"
fi
echo "$out"
