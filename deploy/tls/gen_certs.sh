#!/usr/bin/env bash
# TLS material for the gRPC broker: a private CA, the broker's server certificate (with SANs),
# and optional device client certificates for mutual TLS.
#
#   deploy/tls/gen_certs.sh [-o OUT_DIR] [-n BROKER_NAME]... [-i BROKER_IP]... [-d DEVICE_ID]... [-D DAYS]
#
#   -o  output directory (default: deploy/tls/out; created, mode 700)
#   -n  a DNS name of the broker (repeatable; default: localhost)
#   -i  an IP address of the broker (repeatable; default: 127.0.0.1)
#   -d  a device id to issue a client certificate for (repeatable; CN = the device id)
#   -D  validity in days of the leaf certificates (default: 397, the CA/Browser Forum maximum)
#
# Writes ca.crt/ca.key (keep ca.key offline: whoever has it can mint certificates), broker.crt/
# broker.key, and device-<ID>.crt/.key per device. Keys are EC P-256. An existing CA in OUT_DIR is
# reused, and so is an existing broker certificate unless -n or -i is given, so devices can be
# added later:  gen_certs.sh -o certs -d phone-0042
# Devices trust ca.crt; the broker presents broker.crt and, for mutual TLS, checks device
# certificates against ca.crt. The per-device token (`splitsense cloud token`) still applies.
set -euo pipefail

out="$(dirname "$0")/out"
names=()
ips=()
devices=()
days=397
while getopts "o:n:i:d:D:h" opt; do
  case "$opt" in
    o) out="$OPTARG" ;;
    n) names+=("$OPTARG") ;;
    i) ips+=("$OPTARG") ;;
    d) devices+=("$OPTARG") ;;
    D) days="$OPTARG" ;;
    h) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [-o OUT_DIR] [-n DNS]... [-i IP]... [-d DEVICE_ID]... [-D DAYS]" >&2; exit 2 ;;
  esac
done
reissue_broker=0
[[ ${#names[@]} -gt 0 || ${#ips[@]} -gt 0 ]] && reissue_broker=1
[[ ${#names[@]} -eq 0 ]] && names=(localhost)
[[ ${#ips[@]} -eq 0 ]] && ips=(127.0.0.1)
[[ "$days" =~ ^[0-9]+$ && "$days" -gt 0 ]] || { echo "error: -D needs a number of days > 0" >&2; exit 2; }
for d in "${devices[@]+"${devices[@]}"}"; do
  [[ "$d" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || { echo "error: device id '$d' must match [A-Za-z0-9_.-]{1,64}" >&2; exit 2; }
done
command -v openssl >/dev/null || { echo "error: openssl is not installed" >&2; exit 1; }

umask 077
mkdir -p "$out"
cd "$out"

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [[ -f ca.key && -f ca.crt ]]; then
  echo "reusing the CA in $out"
else
  newkey ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/O=splitsense/CN=splitsense CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
  echo "created CA: $out/ca.crt"
fi

# issue NAME CN EXT_FILE: a leaf key + certificate signed by the CA
issue() {
  newkey "$1.key"
  openssl req -new -key "$1.key" -subj "/O=splitsense/CN=$2" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days "$days" \
    -extfile "$3" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$3"
  openssl verify -CAfile ca.crt "$1.crt" >/dev/null
}

if [[ -f broker.crt && -f broker.key && $reissue_broker -eq 0 ]]; then
  echo "keeping the broker certificate in $out (give -n/-i to reissue it)"
else
  san=""
  for n in "${names[@]}"; do san+="${san:+,}DNS:$n"; done
  for i in "${ips[@]}"; do san+="${san:+,}IP:$i"; done
  cat > broker.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
  issue broker "${names[0]}" broker.ext
  echo "broker certificate: $out/broker.crt (SAN $san)"
fi

for d in "${devices[@]+"${devices[@]}"}"; do
  cat > "device-$d.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
EXT
  issue "device-$d" "$d" "device-$d.ext"
  echo "device certificate: $out/device-$d.crt"
done
chmod 600 ./*.key
chmod 644 ./*.crt
