#!/usr/bin/env python3
"""Checks one Web Push request sealpost made, with implementations other
than sealpost's and the Rust fake's: Mozilla's `http_ece` decrypts the body
(RFC 8291/8188) with the subscription's private key, `py_vapid` verifies the
VAPID JWT (RFC 8292) with the `k` the request carries.

Reads a JSON object on stdin:
  {"origin": "http://127.0.0.1:<port>",       # the push service's origin
   "headers": {"<lowercase name>": "<value>"}, # the request's headers
   "body": "<base64url>",                      # the request's body
   "private_key": "<base64url 32-byte scalar>",  # the subscription's
   "auth": "<base64url 16 bytes>"}
Prints {"plaintext": "...", "claims": {...}, "k": "..."} and exits 0 when
every check passes; otherwise prints why on stderr and exits 1.
"""

import base64
import json
import sys
import time

import http_ece
import py_vapid
import py_vapid.jwt
from cryptography.hazmat.primitives.asymmetric import ec


def b64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def fail(why):
    print("cross-check failed: " + why, file=sys.stderr)
    sys.exit(1)


def vapid_params(value):
    """`vapid t=..., k=...` (RFC 8292 section 3: auth-params, commas and
    optional spaces between them) as a dict."""
    scheme, _, rest = value.partition(" ")
    if scheme.lower() != "vapid":
        fail("Authorization scheme is %r, not vapid" % scheme)
    params = {}
    for part in rest.split(","):
        name, sep, val = part.strip().partition("=")
        if not sep:
            fail("Authorization parameter %r has no value" % part)
        params[name] = val
    if set(params) != {"t", "k"}:
        fail("Authorization parameters are %r, not t and k" % sorted(params))
    return params


def main():
    request = json.load(sys.stdin)
    headers = request["headers"]

    for name in ("ttl", "content-encoding", "authorization"):
        if name not in headers:
            fail("no %s header" % name)
    if not headers["ttl"].isdigit():
        fail("TTL %r is not a number" % headers["ttl"])
    if headers["content-encoding"] != "aes128gcm":
        fail("Content-Encoding is %r" % headers["content-encoding"])

    body = b64url(request["body"])
    if len(body) > 4096:
        fail("body of %d bytes" % len(body))

    # VAPID: the signature with k (py_vapid's own parser wants no space
    # after the comma, which RFC 8292's example has: hand it the
    # parameters as it reads them).
    params = vapid_params(headers["authorization"])
    try:
        if not py_vapid.Vapid02.verify("vapid t=%s,k=%s" % (params["t"], params["k"])):
            fail("py_vapid: the JWT signature does not verify with k")
        claims = py_vapid.jwt.decode(params["t"], params["k"])
    except Exception as e:  # InvalidSignature and friends
        fail("py_vapid: %r" % e)
    jwt_header = json.loads(b64url(params["t"].split(".")[0]))
    if jwt_header.get("alg") != "ES256":
        fail("JWT alg %r" % jwt_header.get("alg"))
    if claims.get("aud") != request["origin"]:
        fail("aud %r is not %r" % (claims.get("aud"), request["origin"]))
    now = int(time.time())
    exp = claims.get("exp")
    if not isinstance(exp, int) or exp <= now or exp > now + 24 * 3600:
        fail("exp %r is not within 24 h of now (%d)" % (exp, now))
    if not py_vapid._check_sub(claims.get("sub", "")):
        fail("sub %r is not a mailto: or https: URI" % claims.get("sub"))

    # RFC 8291: decrypt as the browser would.
    scalar = int.from_bytes(b64url(request["private_key"]), "big")
    private_key = ec.derive_private_key(scalar, ec.SECP256R1())
    try:
        plaintext = http_ece.decrypt(
            body,
            private_key=private_key,
            auth_secret=b64url(request["auth"]),
            version="aes128gcm",
        )
    except Exception as e:
        fail("http_ece cannot decrypt the body: %r" % e)

    json.dump(
        {"plaintext": plaintext.decode("utf-8"), "claims": claims, "k": params["k"]},
        sys.stdout,
    )


if __name__ == "__main__":
    main()
