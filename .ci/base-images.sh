#!/usr/bin/env bash
# Makes the base images the Dockerfile names, without pulling anything: this
# machine's Docker Engine has no registry and starts with no images.
#
#   debian:bookworm-slim          a minbase debootstrap of Debian 12 from
#                                 Debian's mirror, loaded with `docker import`
#   rust:<V>-slim-bookworm        that image plus gcc/libc6-dev/ca-certificates
#                                 (from the mirror) and this machine's Rust
#                                 toolchain V (`rustc --version`), laid out as
#                                 the official image lays it out
#
# Users with internet get the official images of the same names; the
# Dockerfile is the same for both. What differs is only in the images made
# here, never in the Dockerfile:
#   - they trust this machine's CA bundle (/etc/ssl/certs/ca-certificates.crt),
#     without which TLS to crates.io and PyPI fails inside a container here
#     ("self-signed certificate in certificate chain"), and point pip and
#     OpenSSL-based clients at it (PIP_CERT, SSL_CERT_FILE);
#   - apt reaches Debian's mirror over plain HTTP, as on this machine.
#
# An image that exists with the same recipe stamp is kept; NIN_FRESH_IMAGES=1
# removes them first (CI does, to build from nothing). Prints the Rust
# version it tagged, for `docker build --build-arg RUST_VERSION=...`, on
# stdout; everything else on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
# Progress goes to stderr; stdout carries only the Rust version (last line).
exec 3>&1 1>&2

mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
ca_bundle=/etc/ssl/certs/ca-certificates.crt
rust_version=$(rustc --version | awk '{ print $2 }')
sysroot=$(rustc --print sysroot)
debian_tag=debian:bookworm-slim
rust_tag=rust:$rust_version-slim-bookworm
# Any change to this script or to the CA bundle makes new images.
stamp=$( (cat "$0" "$ca_bundle"; echo "$rust_version") | sha256sum | cut -c1-16)

has_image() { # has_image TAG: exists and was made by this recipe
  [ "$(docker image inspect --format '{{ index .Config.Labels "nin.ci-base" }}' "$1" 2>/dev/null)" = "$stamp" ]
}

if [ "${NIN_FRESH_IMAGES:-0}" = 1 ]; then
  docker image rm -f "$rust_tag" "$debian_tag" >/dev/null 2>&1 || true
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! has_image "$debian_tag"; then
  echo "-- $debian_tag: debootstrap --variant=minbase bookworm from $mirror"
  command -v debootstrap >/dev/null || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq debootstrap
  }
  started=$(date +%s)
  root=$work/rootfs
  debootstrap --variant=minbase bookworm "$root" "$mirror" > "$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
  }
  cat > "$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security_mirror bookworm-security main
EOF
  # As the official slim image: no documentation, man pages or locales from
  # packages installed later, and no apt caches left in layers.
  cat > "$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Install-Recommends "false";
EOF
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*
  # This machine's CA bundle: as a local CA (kept by update-ca-certificates
  # when an image installs the ca-certificates package) and as the bundle.
  install -D -m 0644 "$ca_bundle" "$root/usr/local/share/ca-certificates/nin-ci-machine.crt"
  install -D -m 0644 "$ca_bundle" "$root/etc/ssl/certs/ca-certificates.crt"
  tar -C "$root" -c . | docker import \
    --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "ENV SSL_CERT_FILE=$ca_bundle PIP_CERT=$ca_bundle" \
    --change "LABEL nin.ci-base=$stamp" \
    - "$debian_tag" > /dev/null
  rm -rf "$root"
  echo "$debian_tag made in $(($(date +%s) - started)) s"
fi

if ! has_image "$rust_tag"; then
  echo "-- $rust_tag: $debian_tag + this machine's Rust $rust_version ($sysroot)"
  started=$(date +%s)
  ctx=$work/rust
  mkdir -p "$ctx/toolchain"
  # The compiler and standard library, without the 800 MB of documentation.
  cp -a "$sysroot/bin" "$sysroot/lib" "$ctx/toolchain/"
  cat > "$ctx/Dockerfile" <<EOF
FROM $debian_tag
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:\$PATH RUST_VERSION=$rust_version
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \\
 && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rustup/toolchains/$rust_version-x86_64-unknown-linux-gnu
RUN mkdir -p /usr/local/cargo/bin \\
 && for tool in /usr/local/rustup/toolchains/$rust_version-x86_64-unknown-linux-gnu/bin/*; do \\
      ln -s "\$tool" /usr/local/cargo/bin/; done \\
 && rustc --version && cargo --version
LABEL nin.ci-base=$stamp
EOF
  DOCKER_BUILDKIT=0 docker build -q -t "$rust_tag" "$ctx" > /dev/null
  echo "$rust_tag made in $(($(date +%s) - started)) s"
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$debian_tag"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$rust_tag"
echo "$rust_version" >&3
