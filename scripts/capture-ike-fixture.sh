#!/usr/bin/env bash
# Recaptures the IKEv2 key-derivation fixtures under tests/fixtures/ike/: what
# strongSwan derived in real exchanges between two strongSwan peers, so that
# vpnnat's prf+ (RFC 7296 §2.13), SKEYSEED and SK_* (§2.14), CHILD_SA keying
# material (§2.17), IKE_SA rekey keys (§2.18) and PSK AUTH (§2.15) can be
# checked against an independent implementation.
#
# Per DH group (x25519 = group 31, modp2048 = group 14), with IKE proposal
# aes256gcm16-prfsha256-<group> and ESP proposal aes256gcm16-<group>-noesn:
# IKE_SA_INIT + IKE_AUTH (PSK), a CHILD_SA rekey with PFS and an IKE_SA rekey,
# both started by the original initiator. charon logs at level 4 for ike, enc,
# chd and net: it then prints the DH shared secret, SKEYSEED, SK_d, SK_e*,
# SK_p*, the AUTH octets, the CHILD_SA keys, the payloads it generates and
# parses, and every packet it receives. A Python check recomputes every
# derived value from the logged inputs before a fixture is written.
#
# Everything runs in two network namespaces of its own joined by one veth
# pair (198.51.100.1 initiator, 198.51.100.2 responder; no default route;
# deleted on exit, even on failure). Needs root, python3 and strongSwan
# (scripts/setup.sh).
set -euo pipefail

[ "$(id -u)" -eq 0 ] || { echo "capture-ike-fixture.sh: needs root (network namespace)" >&2; exit 1; }
for tool in ip python3 swanctl /usr/sbin/charon-systemd; do
    command -v "$tool" >/dev/null || { echo "capture-ike-fixture.sh: $tool is missing" >&2; exit 1; }
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
peer="$repo/scripts/strongswan-peer.sh"
out="$repo/tests/fixtures/ike"
ini="vnike$$i"
res="vnike$$r"
tmp="$(mktemp -d)"
psk="vpnnat-fixture-psk-0123456789abcdef"

cleanup() {
    "$peer" stop --ns "$ini" --dir "$tmp/ini" >/dev/null 2>&1 || true
    "$peer" stop --ns "$res" --dir "$tmp/res" >/dev/null 2>&1 || true
    ip netns del "$ini" 2>/dev/null || true
    ip netns del "$res" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

ip netns add "$ini"
ip netns add "$res"
ip -n "$ini" link add i0 type veth peer name r0 netns "$res"
ip -n "$ini" addr add 198.51.100.1/24 dev i0
ip -n "$res" addr add 198.51.100.2/24 dev r0
for ns in "$ini" "$res"; do ip -n "$ns" link set lo up; done
ip -n "$ini" link set i0 up
ip -n "$res" link set r0 up
# The traffic selectors' own addresses (charon's route source).
ip -n "$ini" addr add 10.201.1.1/32 dev lo
ip -n "$res" addr add 10.201.2.1/32 dev lo

for group in x25519 modp2048; do
    opts=(--psk "$psk" --loglevel 1 --log ike=4,enc=4,chd=4,net=4
          --ike-proposals "aes256gcm16-prfsha256-$group"
          --esp-proposals "aes256gcm16-$group-noesn")
    "$peer" start --ns "$res" --dir "$tmp/res" --local 198.51.100.2 --remote 198.51.100.1 \
        --local-ts 10.201.2.0/24 --remote-ts 10.201.1.0/24 "${opts[@]}" >/dev/null
    "$peer" start --ns "$ini" --dir "$tmp/ini" --local 198.51.100.1 --remote 198.51.100.2 \
        --local-ts 10.201.1.0/24 --remote-ts 10.201.2.0/24 --role initiator "${opts[@]}" >/dev/null
    # The SA list (SPIs) after each step: established, CHILD rekey, IKE rekey.
    "$peer" status --raw --ns "$ini" --dir "$tmp/ini" > "$tmp/$group.sas0"
    "$peer" rekey --ns "$ini" --dir "$tmp/ini" >/dev/null
    "$peer" status --raw --ns "$ini" --dir "$tmp/ini" > "$tmp/$group.sas1"
    "$peer" rekey --ike --ns "$ini" --dir "$tmp/ini" >/dev/null
    "$peer" status --raw --ns "$ini" --dir "$tmp/ini" > "$tmp/$group.sas2"
    cp "$tmp/ini/charon.log" "$tmp/$group.ini.log"
    cp "$tmp/res/charon.log" "$tmp/$group.res.log"
    "$peer" stop --ns "$ini" --dir "$tmp/ini" >/dev/null
    "$peer" stop --ns "$res" --dir "$tmp/res" >/dev/null
done

mkdir -p "$out"
python3 - "$tmp" "$out" "$psk" <<'PY'
import hashlib, hmac, re, sys

tmp, out, psk = sys.argv[1], sys.argv[2], sys.argv[3].encode()

HEAD = re.compile(r"^\S+ (\d+)\[(\w+)\] (.*?)=> (\d+) bytes @ \S+$")
DUMP = re.compile(r"^\S+ (\d+)\[(\w+)\]\s+(\d+): (.*)$")
PAYLOAD_GEN = re.compile(r"generating payload of type (\w+)")
PAYLOAD_PARSE = re.compile(r"parsing (\w+) payload, \d+ bytes left")
RULE = re.compile(r"(generating|parsing) rule \d+ (\w+)")


def dumps(path):
    """Every hex dump of a charon log as (label, bytes) in order, with the
    chunk data of generated and parsed NONCE / KEY_EXCHANGE payloads labelled
    "gen NONCE", "parse KEY_EXCHANGE", ... Lines of threads interleave, so
    the state is kept per thread."""
    found = []
    state = {}  # thread -> dict(label, need, data, payload, rule)
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        m = HEAD.match(line)
        if m:
            th, _grp, label, n = m.group(1), m.group(2), m.group(3).strip(), int(m.group(4))
            st = state.setdefault(th, {})
            if not label and st.get("rule") == "CHUNK_DATA" and st.get("payload") in ("NONCE", "KEY_EXCHANGE"):
                label = "%s %s" % (st["dir"], st["payload"])
            st.update(label=label, need=n, data=bytearray())
            if n == 0:
                found.append((label, b""))
                st["need"] = None
            continue
        m = DUMP.match(line)
        if m and state.get(m.group(1), {}).get("need"):
            st = state[m.group(1)]
            take = min(16, st["need"] - len(st["data"]))
            st["data"] += bytes.fromhex(m.group(4)[: take * 3])
            if len(st["data"]) == st["need"]:
                found.append((st["label"], bytes(st["data"])))
                st["need"] = None
            continue
        m = re.match(r"^\S+ (\d+)\[(\w+)\] (.*)$", line)
        if not m:
            continue
        st = state.setdefault(m.group(1), {})
        text = m.group(3)
        g = PAYLOAD_GEN.search(text) or PAYLOAD_PARSE.search(text)
        if g:
            st["payload"] = g.group(1)
            st["dir"] = "gen" if text.lstrip().startswith("generating") else "parse"
            st["rule"] = None
        r = RULE.search(text)
        if r:
            st["rule"] = r.group(2)
    return found


def all_of(found, label):
    return [d for (l, d) in found if l == label]


def prf(key, data):
    return hmac.new(key, data, hashlib.sha256).digest()


def prf_plus(key, seed, n):
    # RFC 7296 §2.13: T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n)
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = prf(key, t + seed + bytes([i]))
        out += t
        i += 1
    return out[:n]


def sas(path):
    text = open(path).read()
    ike = re.search(r"state=ESTABLISHED [^{]*?initiator-spi=(\w+) responder-spi=(\w+)", text)
    child = re.findall(r"state=INSTALLED mode=TUNNEL protocol=ESP \S+ spi-in=(\w+) spi-out=(\w+)", text)
    assert ike and len(child) == 1, path
    return ike.group(1), ike.group(2), child[0][0], child[0][1]


def check(what, got, want):
    if got != want:
        sys.exit("capture-ike-fixture.sh: %s does not match strongSwan's: %s != %s" % (what, got.hex(), want.hex()))


def ike_keys(skeyseed, ni, nr, spi_i, spi_r):
    # AES-GCM-16-256: no integrity keys (SK_ai, SK_ar are empty, RFC 5282 §7.1),
    # SK_e* are 32 key + 4 salt bytes (RFC 5282 §7.1); PRF-HMAC-SHA256: 32-byte SK_d/SK_p*.
    km = prf_plus(skeyseed, ni + nr + spi_i + spi_r, 32 + 36 + 36 + 32 + 32)
    return {"sk_d": km[0:32], "sk_ai": b"", "sk_ar": b"", "sk_ei": km[32:68],
            "sk_er": km[68:104], "sk_pi": km[104:136], "sk_pr": km[136:168]}


GROUPS = {"x25519": (31, "CURVE_25519"), "modp2048": (14, "MODP_2048")}
KEY_PAD = b"Key Pad for IKEv2"
ID_I = bytes([1, 0, 0, 0, 198, 51, 100, 1])  # ID_IPV4_ADDR 198.51.100.1 (RFC 7296 §3.5)
ID_R = bytes([1, 0, 0, 0, 198, 51, 100, 2])

for group, (num, name) in GROUPS.items():
    a = dumps("%s/%s.ini.log" % (tmp, group))
    b = dumps("%s/%s.res.log" % (tmp, group))
    spi_i, spi_r, c_in, c_out = (bytes.fromhex(x) for x in sas("%s/%s.sas0" % (tmp, group)))
    _, _, rc_in, rc_out = (bytes.fromhex(x) for x in sas("%s/%s.sas1" % (tmp, group)))
    new_spi_i, new_spi_r, _, _ = (bytes.fromhex(x) for x in sas("%s/%s.sas2" % (tmp, group)))

    gen_nonce, parse_nonce = all_of(a, "gen NONCE"), all_of(a, "parse NONCE")
    assert len(gen_nonce) == 3 and len(parse_nonce) == 3, (group, len(gen_nonce), len(parse_nonce))
    ni, nr = gen_nonce[0], parse_nonce[0]
    ke_i, ke_r = all_of(a, "gen KEY_EXCHANGE")[0], all_of(a, "parse KEY_EXCHANGE")[0]
    g_irs = all_of(a, "shared Diffie Hellman secret")
    skeyseeds = all_of(a, "SKEYSEED")
    assert len(g_irs) == 2 and len(skeyseeds) == 2, group
    logged = {k: all_of(a, "%s secret" % k.replace("sk", "Sk")) for k in
              ("sk_d", "sk_ei", "sk_er", "sk_pi", "sk_pr")}
    # The responder derived the same.
    check("responder's SK_d", all_of(b, "Sk_d secret")[0], logged["sk_d"][0])

    # IKE_SA_INIT (RFC 7296 §2.14): SKEYSEED = prf(Ni | Nr, g^ir).
    g_ir = g_irs[0]
    skeyseed = prf(ni + nr, g_ir)
    check("SKEYSEED", skeyseed, skeyseeds[0])
    keys = ike_keys(skeyseed, ni, nr, spi_i, spi_r)
    for k, v in logged.items():
        check(k, keys[k], v[0])

    # Messages: what each side received (an IKE_AUTH on 4500 carries the
    # 4-byte non-ESP marker, RFC 3948 §2.2, which is not part of the message).
    init_req = all_of(b, "received packet")[0]
    init_resp = all_of(a, "received packet")[0]
    auth_req, auth_resp = all_of(b, "received packet")[1], all_of(a, "received packet")[1]
    assert auth_req[:4] == b"\0\0\0\0" and auth_resp[:4] == b"\0\0\0\0"
    auth_req, auth_resp = auth_req[4:], auth_resp[4:]

    # PSK AUTH (RFC 7296 §2.15): prf(prf(PSK, "Key Pad for IKEv2"), octets),
    # octets = the peer's first message | the other's nonce | prf(SK_p, ID').
    octets_i = init_req + nr + prf(keys["sk_pi"], ID_I)
    octets_r = init_resp + ni + prf(keys["sk_pr"], ID_R)
    logged_octets = all_of(a, "octets = message + nonce + prf(Sk_px, IDx')")
    check("initiator's AUTH octets", octets_i, logged_octets[0])
    check("responder's AUTH octets", octets_r, logged_octets[1])
    auths = all_of(a, "AUTH = prf(prf(secret, keypad), octets)")
    auth_i = prf(prf(psk, KEY_PAD), octets_i)
    auth_r = prf(prf(psk, KEY_PAD), octets_r)
    check("AUTH_i", auth_i, auths[0])
    check("AUTH_r", auth_r, auths[1])

    # The CHILD_SA of IKE_AUTH (RFC 7296 §2.17): KEYMAT = prf+(SK_d, Ni | Nr),
    # initiator→responder key first.
    child_i = all_of(a, "encryption initiator key")
    child_r = all_of(a, "encryption responder key")
    km = prf_plus(keys["sk_d"], ni + nr, 72)
    check("CHILD_SA initiator key", km[:36], child_i[0])
    check("CHILD_SA responder key", km[36:], child_r[0])

    # CHILD_SA rekey with PFS: KEYMAT = prf+(SK_d, g^ir (new) | Ni | Nr).
    rc_ni, rc_nr = gen_nonce[1], parse_nonce[1]
    rc_g_ir = all_of(a, "DH secret")[0]
    km = prf_plus(keys["sk_d"], rc_g_ir + rc_ni + rc_nr, 72)
    check("rekeyed CHILD_SA initiator key", km[:36], child_i[1])
    check("rekeyed CHILD_SA responder key", km[36:], child_r[1])

    # IKE_SA rekey (RFC 7296 §2.18): SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr),
    # then SK_* = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr) with the new SA's SPIs.
    ri_ni, ri_nr = gen_nonce[2], parse_nonce[2]
    ri_g_ir = g_irs[1]
    ri_skeyseed = prf(keys["sk_d"], ri_g_ir + ri_ni + ri_nr)
    check("rekeyed SKEYSEED", ri_skeyseed, skeyseeds[1])
    ri_keys = ike_keys(ri_skeyseed, ri_ni, ri_nr, new_spi_i, new_spi_r)
    for k, v in logged.items():
        check("rekeyed " + k, ri_keys[k], v[1])

    rows = [
        ("# IKE_SA_INIT + IKE_AUTH", None),
        ("prf", "PRF_HMAC_SHA2_256"), ("encr", "AES_GCM_16_256"), ("dh_group", str(num)),
        ("psk", psk.hex()), ("id_i", ID_I.hex()), ("id_r", ID_R.hex()),
        ("spi_i", spi_i.hex()), ("spi_r", spi_r.hex()),
        ("ke_i", ke_i.hex()), ("ke_r", ke_r.hex()), ("ni", ni.hex()), ("nr", nr.hex()),
        ("g_ir", g_ir.hex()), ("skeyseed", skeyseed.hex()),
    ] + [(k, keys[k].hex()) for k in ("sk_d", "sk_ai", "sk_ar", "sk_ei", "sk_er", "sk_pi", "sk_pr")] + [
        ("ike_sa_init_request", init_req.hex()), ("ike_sa_init_response", init_resp.hex()),
        ("auth_i", auth_i.hex()), ("auth_r", auth_r.hex()),
        ("ike_auth_request", auth_req.hex()), ("ike_auth_response", auth_resp.hex()),
        ("child_spi_i", c_in.hex()), ("child_spi_r", c_out.hex()),
        ("child_key_i", child_i[0].hex()), ("child_key_r", child_r[0].hex()),
        ("# CREATE_CHILD_SA: CHILD_SA rekey with PFS, started by the initiator", None),
        ("rekey_child_ni", rc_ni.hex()), ("rekey_child_nr", rc_nr.hex()),
        ("rekey_child_g_ir", rc_g_ir.hex()),
        ("rekey_child_spi_i", rc_in.hex()), ("rekey_child_spi_r", rc_out.hex()),
        ("rekey_child_key_i", child_i[1].hex()), ("rekey_child_key_r", child_r[1].hex()),
        ("# CREATE_CHILD_SA: IKE_SA rekey, started by the initiator (SK_d above is the old one)", None),
        ("rekey_ike_spi_i", new_spi_i.hex()), ("rekey_ike_spi_r", new_spi_r.hex()),
        ("rekey_ike_ni", ri_ni.hex()), ("rekey_ike_nr", ri_nr.hex()),
        ("rekey_ike_g_ir", ri_g_ir.hex()), ("rekey_ike_skeyseed", ri_skeyseed.hex()),
    ] + [("rekey_ike_" + k, ri_keys[k].hex()) for k in ("sk_d", "sk_ai", "sk_ar", "sk_ei", "sk_er", "sk_pi", "sk_pr")]

    with open("%s/%s.txt" % (out, group), "w") as f:
        f.write("# strongSwan 5.9.8 <-> strongSwan, IKE aes256gcm16-prfsha256-%s, ESP aes256gcm16-%s-noesn;\n"
                "# captured by scripts/capture-ike-fixture.sh (see README.md). 'key = hex'; 'key =' is zero length.\n"
                % (group, group))
        for k, v in rows:
            f.write(("\n%s\n" % k) if v is None else ("%s = %s" % (k, v)).rstrip() + "\n")
    print("capture-ike-fixture.sh: %s/%s.txt (every derived value recomputed and matching)" % (out, group))
PY
