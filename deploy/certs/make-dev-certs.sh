#!/bin/sh
# Development certificates for deploy/compose.yaml (run by its `certs`
# one-shot, in an alpine container, or by hand with openssl on the host):
#
#   sh deploy/certs/make-dev-certs.sh deploy/certs/generated
#
# Makes, unless they already exist, in the folder given:
#   ca.crt, ca.key          a development CA (clients: STEPLOG_TLS_CA=ca.crt)
#   server.crt, server.key  the service's certificate: steplog-1, steplog-2,
#                           localhost, 127.0.0.1, ::1 (gRPC and /metrics)
#   metrics-users           user:sha256:<hex> for STEPLOG_METRICS_BASIC_AUTH
#   prometheus-password     the scrape password, for Prometheus's password_file
# from METRICS_PASSWORD (a long random value: sha256 is for those).
# Files readable by the service's user (uid 10001) only, and root.
set -eu
out=${1:?usage: make-dev-certs.sh OUTPUT_DIR}
command -v openssl >/dev/null 2>&1 || apk add --no-cache openssl >/dev/null
mkdir -p "$out"
cd "$out"
if [ ! -s server.crt ] || [ ! -s server.key ] || [ ! -s ca.crt ]; then
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout ca.key -out ca.crt -days 825 -subj "/CN=steplog development CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout server.key -out server.csr -subj "/CN=steplog"
  printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=DNS:steplog-1,DNS:steplog-2,DNS:localhost,IP:127.0.0.1,IP:::1" > server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.crt -days 825 -extfile server.ext
  rm -f server.csr server.ext ca.srl
  echo "made a development CA and server certificate in $out"
fi
if [ ! -s metrics-users ]; then
  password=${METRICS_PASSWORD:?set METRICS_PASSWORD (deploy/.env)}
  digest=$(printf '%s' "$password" | openssl dgst -sha256 -r | cut -d' ' -f1)
  printf 'prometheus:sha256:%s\n' "$digest" > metrics-users
  printf '%s' "$password" > prometheus-password
  echo "made the /metrics users file in $out"
fi
# The service runs as 10001; Prometheus's image as 65534 (nobody).
chown 10001:10001 server.key metrics-users 2>/dev/null || true
chmod 0400 server.key ca.key
chmod 0444 ca.crt server.crt metrics-users prometheus-password
