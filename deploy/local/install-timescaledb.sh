#!/usr/bin/env bash
# Build the TimescaleDB extension (Apache-licensed edition) from Debian's source
# package against the installed PostgreSQL, when it is missing.
#
# Debian 12 (bookworm) does not carry timescaledb; the next release does. We read
# the mirror this machine's own apt sources use and add a deb-src entry for that
# newer release, so no registry host name is written into the repository.
set -euo pipefail

PG_CONFIG=${PG_CONFIG:-$(ls -d /usr/lib/postgresql/*/bin/pg_config 2>/dev/null | sort -V | tail -n1)}
if [ -z "$PG_CONFIG" ] || [ ! -x "$PG_CONFIG" ]; then
  echo "install-timescaledb: no PostgreSQL server found (postgresql-15 must be installed first)" >&2
  exit 1
fi
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
SHAREDIR=$("$PG_CONFIG" --sharedir)
PGVER=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')

if ls "$SHAREDIR"/extension/timescaledb.control >/dev/null 2>&1 && ls "$PKGLIBDIR"/timescaledb*.so >/dev/null 2>&1; then
  exit 0
fi

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

NEWER=${TIMESCALEDB_SUITE:-trixie}
MIRROR=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  if grep -qE '^Suites:.*\bbookworm\b' "$f" && grep -qE '^URIs:.*/debian/?$' "$f"; then
    MIRROR=$(awk '/^URIs:/ {print $2; exit}' "$f")
    break
  fi
done
if [ -z "$MIRROR" ] && [ -f /etc/apt/sources.list ]; then
  MIRROR=$(awk '$1=="deb" && $0 ~ /bookworm/ && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' /etc/apt/sources.list)
fi
if [ -z "$MIRROR" ]; then
  echo "install-timescaledb: could not find the Debian mirror in the apt sources" >&2
  exit 1
fi

LIST=/etc/apt/sources.list.d/steplog-timescaledb-src.sources
if [ ! -f "$LIST" ]; then
  $SUDO tee "$LIST" >/dev/null <<SRC
Types: deb-src
URIs: $MIRROR
Suites: $NEWER
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
# Source entries only: no binary package can be pulled from the newer release.
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  dpkg-dev cmake gcc make libssl-dev libkrb5-dev "postgresql-server-dev-$PGVER" >/dev/null

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
apt-get source -qq --download-only timescaledb
dpkg-source -x --no-check ./timescaledb_*.dsc src >/dev/null
cd src
./bootstrap -DPG_CONFIG="$PG_CONFIG" -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
  -DWARNINGS_AS_ERRORS=OFF -DAPACHE_ONLY=ON -DSEND_TELEMETRY_DEFAULT=OFF \
  -DUSE_TELEMETRY=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
cd build
make -j"$(nproc)" >/dev/null
$SUDO make install >/dev/null
echo "install-timescaledb: installed $(ls "$PKGLIBDIR"/timescaledb-*.so | head -n1)"
