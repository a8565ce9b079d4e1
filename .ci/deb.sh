#!/usr/bin/env bash
# The Debian package: builds it with cargo-deb, installs it with dpkg -i,
# and runs the installed binary on the installed configuration, as root and
# as the service user. Needs root (or sudo) for dpkg. Run after the release
# build of the smoke runs, it only packages that build.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)

echo "== cargo-deb"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo deb --version

echo "== build the package"
cargo deb --locked --strip
version=$(cargo metadata --no-deps --format-version 1 --locked \
  | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "wnsgate"))')
deb=$(ls -t target/debian/wnsgate_"$version"-*.deb | head -1)
echo "$deb"
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"

echo "== install it"
"${as_root[@]}" dpkg -i "$deb"

echo "== the installed gateway"
fail() { echo "deb.sh: $*" >&2; exit 1; }
[ "$(command -v wnsgate)" = /usr/bin/wnsgate ] || fail "wnsgate on PATH is $(command -v wnsgate), not /usr/bin/wnsgate"
out=$(/usr/bin/wnsgate version)
[ "$out" = "wnsgate $version" ] || fail "wnsgate version printed '$out', not 'wnsgate $version'"
echo "$out"
/usr/bin/wnsgate check-config /etc/wnsgate/wnsgate.toml
# The unit runs check-config as the service user before every start.
"${as_root[@]}" runuser -u wnsgate -- /usr/bin/wnsgate check-config /etc/wnsgate/wnsgate.toml

getent passwd wnsgate >/dev/null || fail "no wnsgate user"
[ "$(stat -c %U:%a /var/lib/wnsgate)" = wnsgate:750 ] \
  || fail "/var/lib/wnsgate is $(stat -c %U:%a /var/lib/wnsgate), not wnsgate:750"
[ "$(stat -c %U:%G:%a /etc/wnsgate/wnsgate.toml)" = root:wnsgate:640 ] \
  || fail "/etc/wnsgate/wnsgate.toml is $(stat -c %U:%G:%a /etc/wnsgate/wnsgate.toml), not root:wnsgate:640"
unit=$(dpkg -L wnsgate | grep '/wnsgate\.service$') || fail "the package has no wnsgate.service"
echo "unit: $unit"
if command -v systemd-analyze >/dev/null; then
  systemd-analyze verify "$unit"
fi
echo "== deb.sh: OK"
