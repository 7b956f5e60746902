# Sourced by tests/bed/cluster.sh and tests/bed/nodes/nodes.sh: certificates
# signed by the local cluster's CA in "$PKI" (ca.crt, ca.key).

# sign NAME SUBJECT [SAN]: NAME.key (mode 600) and NAME.crt signed by the
# cluster CA; with a SAN a serving certificate (that may also act as a
# client), without one a client certificate.
sign() {
  local name="$1" subj="$2" san="${3:-}"
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  chmod 600 "$PKI/$name.key"
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  local ext="$PKI/$name.ext"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ -n $san ]]; then echo "extendedKeyUsage=serverAuth,clientAuth"; echo "subjectAltName=$san"; else echo "extendedKeyUsage=clientAuth"; fi
  } > "$ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}
