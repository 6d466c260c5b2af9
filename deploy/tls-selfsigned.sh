#!/bin/sh
# A certificate pair for pacsbridge's TLS front, for a try: a throwaway CA signs a server certificate.
#
#   deploy/tls-selfsigned.sh deploy/tls [NAME_OR_IP ...]
#
# writes into the folder (created if needed, mode 0700):
#   cert.pem  the server certificate (names: localhost, 127.0.0.1 and each NAME_OR_IP given)
#   key.pem   its private key (mode 0600)
#   ca.pem    the CA certificate: what clients trust, e.g. curl --cacert deploy/tls/ca.pem,
#             SSL_CERT_FILE=deploy/tls/ca.pem for pacsbridge's client, or a browser's/OS's trust store
# The CA's key is deleted once it has signed, so that CA can sign nothing else. Valid 825 days;
# run it again to renew (clients then need the new ca.pem). For real use, put a certificate from
# your organisation's CA (or a public one) into cert.pem (full chain) and key.pem instead.
set -eu
dir=${1:?usage: deploy/tls-selfsigned.sh DIR [HOSTNAME_OR_IP ...]}
shift
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
san="DNS:localhost,IP:127.0.0.1"
cn=localhost
for name in "$@"; do
  if printf '%s' "$name" | grep -Eq '^[0-9.]+$|:'; then san="$san,IP:$name"; else san="$san,DNS:$name"; cn=$name; fi
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -days 825 \
  -subj "/CN=pacsbridge throwaway CA $(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$work/ca-key.pem" -out "$work/ca.pem" 2>/dev/null
openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj "/CN=$cn" \
  -keyout "$work/key.pem" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$work/server.ext"
openssl x509 -req -sha256 -days 825 -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" \
  -CAcreateserial -extfile "$work/server.ext" -out "$work/cert.pem" 2>/dev/null
mv "$work/key.pem" "$dir/key.pem"
mv "$work/cert.pem" "$dir/cert.pem"
mv "$work/ca.pem" "$dir/ca.pem"
chmod 600 "$dir/key.pem"
chmod 644 "$dir/cert.pem" "$dir/ca.pem"
echo "wrote $dir/cert.pem and $dir/key.pem (names: $san); clients trust $dir/ca.pem"
