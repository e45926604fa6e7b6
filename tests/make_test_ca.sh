#!/bin/sh
# make_test_ca.sh DIR -- a throw-away CA and a server certificate for the ciflow emulator.
#
# Writes into DIR (created if missing):
#   ca.pem, ca.key          a self-signed test CA (what ciflow's ca_file points at)
#   server.pem, server.key  a server certificate signed by that CA, SAN DNS:localhost, IP:127.0.0.1
#   other-ca.pem            a second, unrelated CA: verifying the server with it must fail
# Everything is made fresh on each call, valid for 2 days, RSA 2048, SHA-256.  Files are 0644
# and DIR 0755 so that a PostgreSQL server running as another user can read the CA.
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1
mkdir -p "$dir"
cd "$dir"

# openssl writes its random seed file next to HOME; keep it inside DIR.
RANDFILE="$PWD/.rnd"
export RANDFILE

make_ca() {  # make_ca NAME SUBJECT
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 2 \
        -keyout "$1.key" -out "$1.pem" -subj "$2" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

make_ca ca "/CN=ciflow throw-away test CA"
make_ca other-ca "/CN=ciflow unrelated test CA"
rm -f other-ca.key

openssl req -new -newkey rsa:2048 -nodes -sha256 \
    -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
cat > server.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
EOF
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
    -out server.pem -days 2 -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl .rnd

chmod 0755 .
chmod 0644 ca.pem ca.key server.pem server.key other-ca.pem
