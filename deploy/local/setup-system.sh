#!/usr/bin/env bash
# Install the Debian packages steplog's local stack needs, only when missing.
# Touches no system service: packages are installed, never started.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# kubernetes-client: `kubectl kustomize` renders deploy/k8s in the tests.
# nginx: the gRPC load balancer (grpc_pass) of bench/chaos.py, run as a plain process.
# chromium: the web UI's browser tests and bench/ui.py (Playwright drives /usr/bin/chromium;
#   Playwright's own browser download is never used).
for pkg in postgresql-15 postgresql-client-15 prometheus nodejs npm curl kubernetes-client nginx chromium; do
  have_pkg "$pkg" || need+=("$pkg")
done
# npm may come with the nodejs package of another source (it then has no npm package).
if [ "${#need[@]}" -gt 0 ]; then
  filtered=()
  for p in "${need[@]}"; do
    if [ "$p" = npm ] && command -v npm >/dev/null; then continue; fi
    if [ "$p" = nodejs ] && command -v node >/dev/null; then continue; fi
    if [ "$p" = kubernetes-client ] && command -v kubectl >/dev/null; then continue; fi
    filtered+=("$p")
  done
  need=("${filtered[@]+"${filtered[@]}"}")
fi

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  # policy-rc.d keeps the packages' own services from being started.
  placed=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    echo 'exit 101' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    placed=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  [ "$placed" = 0 ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi

bash deploy/local/install-timescaledb.sh
