#!/usr/bin/env bash
# Build the Roost image from deploy/Dockerfile without a Docker engine or a registry:
#
#   1. mmdebstrap makes a Debian bookworm root filesystem with Debian's Python 3.11 and pip,
#      standing in for python:3.11-slim-bookworm (which cannot be pulled here); it is imported
#      into buildah's own storage under that very name, so the Dockerfile's FROM finds it.
#   2. buildah (vfs storage, chroot isolation) builds deploy/Dockerfile, unchanged, on it; its RUN
#      steps reach Debian's mirror (etcd) and PyPI (pip install '.[all]') as usual.
#   3. buildah writes an OCI layout and skopeo a docker-archive tarball of the result:
#
#        ${ROOST_IMAGE_CACHE:-$HOME/.cache/roost-image}/images/<source hash>/oci          (tag <version>)
#        ${ROOST_IMAGE_CACHE:-$HOME/.cache/roost-image}/images/<source hash>/roost-<version>.tar
#
#      with `current` beside images/ pointing at the newest (the two newest builds are kept).
#      The tarball holds roost:<version> for `docker load`, `ctr images import` or
#      `kind load image-archive`.
#
# The source hash covers everything the image is made of: deploy/Dockerfile, .dockerignore,
# pyproject.toml, README.md, LICENSE, src/ (without __pycache__ and *.egg-info) and this script
# (it defines the base). When an image for the hash is there, the script checks it and exits in
# well under a second; the base root filesystem is cached on its own, so a source change only
# reruns step 2 and 3. The last line on stdout is always "<oci layout dir> <docker archive>".
#
#   hack/build-image.sh                build if needed, print the paths
#   hack/build-image.sh --print-paths  print the paths for the current source, build nothing
#   hack/build-image.sh --check        exit 0 when built for the current source, 1 when not
#
# The base is not rebuilt for newer Debian packages by itself: remove <cache>/base to refresh it.
# Knobs: ROOST_IMAGE_CACHE (cache root), ROOST_IMAGE_MIRROR (Debian mirror for the base,
# default http://deb.debian.org/debian; the security suite comes from the same host's
# debian-security). Needs root: it installs its tools with apt-get and runs mmdebstrap and
# buildah as root.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_root="${ROOST_IMAGE_CACHE:-${HOME:-/tmp}/.cache/roost-image}"
mirror="${ROOST_IMAGE_MIRROR:-http://deb.debian.org/debian}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -1)"
[ -n "$version" ] || { echo "error: no version in $repo/pyproject.toml" >&2; exit 2; }
image_name="roost:$version"
base_name="docker.io/library/python:3.11-slim-bookworm"

# What the base is made of; its hash names the cached root filesystem.
base_suite=bookworm
base_packages="ca-certificates,netbase,tzdata,python3,python3-pip,python3-venv,python-is-python3"
base_recipe="suite=$base_suite variant=minbase packages=$base_packages mirror=$mirror recipe=2"

source_hash() {
  (
    cd "$repo"
    {
      for f in deploy/Dockerfile .dockerignore pyproject.toml README.md LICENSE hack/build-image.sh; do
        if [ -f "$f" ]; then sha256sum "$f"; else echo "absent $f"; fi
      done
      find src \( -name __pycache__ -o -name '*.egg-info' \) -prune -o -type f -print0 \
        | LC_ALL=C sort -z | xargs -0 -r sha256sum
    } | sha256sum | cut -c1-16
  )
}

hash="$(source_hash)"
image_dir="$cache_root/images/$hash"
oci_dir="$image_dir/oci"
archive="$image_dir/roost-$version.tar"
stamp="$image_dir/.built"
want_stamp="$image_name source=$hash"

is_built() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ] && [ -f "$oci_dir/index.json" ] \
    && [ -s "$archive" ]
}

case "${1:-}" in
  --print-paths) echo "$oci_dir $archive"; exit 0 ;;
  --check) is_built; exit $? ;;
  "") ;;
  *) echo "usage: $0 [--print-paths|--check]" >&2; exit 2 ;;
esac

# --- tools, from Debian -------------------------------------------------------------------------
# runc is what tests/image runs the result with; uidmap is what buildah expects to find.
need=()
for tool in mmdebstrap:mmdebstrap buildah:buildah umoci:umoci skopeo:skopeo runc:runc newuidmap:uidmap; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "error: need root to install ${need[*]}" >&2; exit 3; fi
  echo "installing ${need[*]} from Debian" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if is_built; then
  echo "$image_name (source $hash): image present" >&2
  echo "$oci_dir $archive"
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "error: building the image needs root (mmdebstrap, buildah)" >&2; exit 3; }

mkdir -p "$cache_root/images" "$cache_root/base"
# One builder at a time (CI and a developer, or two pytest sessions, may ask at once).
exec 9>"$cache_root/.lock"
flock 9
if is_built; then echo "$oci_dir $archive"; exit 0; fi

# buildah's own storage inside the cache: nothing leaks into /var/lib/containers, and vfs needs
# no overlay or fuse support from the kernel.
bah=(buildah --root "$cache_root/storage" --runroot "$cache_root/run" --storage-driver vfs)
log="$cache_root/build.log"
: >"$log"
start=$(date +%s)
echo "building $image_name for source $hash, log: $log" >&2

# --- 1. the base ----------------------------------------------------------------------------------
base_key="$(printf '%s' "$base_recipe" | sha256sum | cut -c1-16)"
base_tar="$cache_root/base/$base_key.tar"
t0=$(date +%s)
if [ ! -s "$base_tar" ]; then
  echo "making the $base_suite base with mmdebstrap ($base_packages)" >&2
  security="${mirror%/debian}/debian-security"
  # merged-usr: /bin, /lib, /sbin as symlinks set up by mmdebstrap itself, so that
  # init-system-helpers does not pull in usrmerge and with it perl (50 MB). Debian marks its
  # Python as externally managed (PEP 668); the python image's interpreter is not, and the
  # Dockerfile pip-installs into it as root, so the marker goes. Documentation is left out as in
  # the slim image; the byte-code stays (the root filesystem is read-only at run time). The
  # hooks' "$1" is the root mmdebstrap passes them, hence the single quotes.
  # shellcheck disable=SC2016
  nice -n 10 mmdebstrap --mode=root --variant=minbase --format=tar --include="$base_packages" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='rm -f "$1"/etc/hostname "$1"/etc/resolv.conf' \
    "$base_suite" "$base_tar.partial" \
    "deb $mirror $base_suite main" \
    "deb $mirror $base_suite-updates main" \
    "deb $security $base_suite-security main" >>"$log" 2>&1 || { tail -30 "$log" >&2; exit 4; }
  mv "$base_tar.partial" "$base_tar"
fi
t1=$(date +%s)
# Imported once per base: a stamp beside the storage says which base the name holds.
base_stamp="$cache_root/storage.base"
if [ "$(cat "$base_stamp" 2>/dev/null)" != "$base_key" ] \
  || ! "${bah[@]}" inspect --type image "$base_name" >/dev/null 2>&1; then
  echo "importing the base into buildah as $base_name" >&2
  ctr="$("${bah[@]}" from --pull=false scratch)"
  {
    "${bah[@]}" add "$ctr" "$base_tar" /
    # What the python image's own config says that matters here.
    "${bah[@]}" config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env LANG=C.UTF-8 --cmd python3 --os linux --arch amd64 "$ctr"
    "${bah[@]}" commit --rm "$ctr" "$base_name"
  } >>"$log" 2>&1 || { "${bah[@]}" rm "$ctr" >/dev/null 2>&1 || true; tail -30 "$log" >&2; exit 4; }
  echo "$base_key" >"$base_stamp"
fi
t2=$(date +%s)

# --- 2. the Dockerfile ------------------------------------------------------------------------------
echo "building deploy/Dockerfile with buildah (chroot isolation, vfs)" >&2
# The RUN steps trust what this machine trusts (a TLS-inspecting proxy's CA in front of PyPI,
# say): the host's CA bundle is mounted over the base's for the build only, never committed.
ca_mount=()
host_ca=/etc/ssl/certs/ca-certificates.crt
[ -s "$host_ca" ] && ca_mount=(--volume "$host_ca:$host_ca:ro")
nice -n 10 "${bah[@]}" build --isolation chroot --pull=false --layers=false "${ca_mount[@]}" \
  -f "$repo/deploy/Dockerfile" -t "$image_name" "$repo" >>"$log" 2>&1 \
  || { tail -30 "$log" >&2; exit 5; }
t3=$(date +%s)

# --- 3. OCI layout and docker archive -----------------------------------------------------------
partial="$image_dir.partial"
rm -rf "$partial"
mkdir -p "$partial"
{
  "${bah[@]}" push "$image_name" "oci:$partial/oci:$version"
  skopeo copy --quiet "oci:$partial/oci:$version" "docker-archive:$partial/roost-$version.tar:$image_name"
} >>"$log" 2>&1 || { tail -30 "$log" >&2; exit 6; }
"${bah[@]}" inspect --type image --format '{{.FromImageID}}' "$image_name" >"$partial/image-id"
cp "$log" "$partial/build.log"
echo "$want_stamp" >"$partial/.built"
rm -rf "$image_dir"
mv "$partial" "$image_dir"
ln -sfn "images/$hash" "$cache_root/current"
# Keep this build and the one before it (switching back to a branch is then free); in buildah's
# storage only the base and this image, the image directories being what callers use.
rm -rf "$cache_root"/images/*.partial
mapfile -t builds < <(ls -1t "$cache_root"/images/*/.built)
for s in "${builds[@]:2}"; do rm -rf "$(dirname "$s")"; done
"${bah[@]}" rmi --prune >>"$log" 2>&1 || true
t4=$(date +%s)

summary="build of $image_name (source $hash): base $((t1 - t0))s, import $((t2 - t1))s, dockerfile $((t3 - t2))s, export $((t4 - t3))s, total $((t4 - start))s"
echo "$summary ($(nproc) cores, $(date -u +%FT%TZ))" | tee -a "$cache_root/build-times.txt" >&2
echo "$oci_dir $archive"
