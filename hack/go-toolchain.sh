#!/usr/bin/env bash
# Print a directory holding a `go` binary: the one on PATH, else the Go toolchain fetched once
# from the Go module proxy (golang.org/toolchain, the zips `go` itself downloads) into
# ~/.cache/roost-go. The kube test control plane is built with it (hack/build-kube-testenv.sh).
set -euo pipefail
if command -v go >/dev/null; then dirname "$(command -v go)"; exit 0; fi
version="${ROOST_GO_VERSION:-go1.26.8}"
case "$(uname -m)" in
  x86_64) arch=amd64 ;; aarch64 | arm64) arch=arm64 ;; *) echo "no Go toolchain for $(uname -m)" >&2; exit 1 ;;
esac
dir="$HOME/.cache/roost-go/$version"
if [ ! -x "$dir/bin/go" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  url="${GOPROXY_URL:-https://proxy.golang.org}/golang.org/toolchain/@v/v0.0.1-$version.linux-$arch.zip"
  echo "fetching $version from $url" >&2
  curl -fsSL --retry 3 -o "$tmp/go.zip" "$url"
  python3 -m zipfile -e "$tmp/go.zip" "$tmp/x"
  mkdir -p "$(dirname "$dir")"
  rm -rf "$dir"
  mv "$tmp"/x/golang.org/toolchain@*/ "$dir"
  chmod -R u+x "$dir/bin" "$dir/pkg/tool"  # zipfile does not keep the modes
fi
echo "$dir/bin"
