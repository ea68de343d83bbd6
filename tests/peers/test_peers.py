"""The real test peers work: Kamailio registers and routes, dnsmasq answers RFC 3263 queries.

sipp drives the MD5 digest REGISTER flow; a few lines of raw SIP over sockets (below) cover
what sipp 3.6 cannot do (SHA-256 digest) and INVITE routing.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from tests.conftest import DnsServerFactory, KamailioFactory
from tests.peers.dnsserver import AAAA, CNAME, NAPTR, SRV, A
from tests.peers.kamailio import (
    Kamailio,
    contact_param_int,
    parse_register_log,
    split_contacts,
)
from tests.peers.ports import HOST, free_port

SIPP = shutil.which("sipp")
SCENARIO = Path(__file__).with_name("sipp") / "register_auth.xml"

needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp not installed")


# -- helpers -------------------------------------------------------------------------------


def sipp_register(
    kam: Kamailio,
    tmp_path: Path,
    *,
    user: str,
    password: str,
    expires: int,
    final: int,
    port: int | None = None,
) -> tuple[subprocess.CompletedProcess[str], str, int]:
    """REGISTER with digest auth via sipp; returns (process, message trace, local port)."""
    assert SIPP is not None
    scenario = tmp_path / f"register_{final}.xml"
    scenario.write_text(SCENARIO.read_text().replace("@@FINAL_STATUS@@", str(final)))
    trace = tmp_path / f"sipp_{secrets.token_hex(3)}_messages.log"
    port = port or free_port("udp")
    done = subprocess.run(
        [
            "timeout", "10", SIPP,
            "-sf", str(scenario),
            "-au", user, "-ap", password,
            "-key", "user", user, "-key", "domain", kam.domain, "-key", "expires", str(expires),
            "-i", HOST, "-p", str(port),
            "-m", "1", "-nostdin", "-timeout", "8s", "-timeout_error",
            "-trace_msg", "-message_file", str(trace),
            "-trace_err", "-error_file", str(tmp_path / "sipp_errors.log"),
            f"{HOST}:{kam.port}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )  # fmt: skip
    return done, trace.read_text() if trace.exists() else "", port


class RawUA:
    """A bare SIP UA over one UDP or TCP socket: just enough to poke the provider."""

    def __init__(self, kam: Kamailio, transport: str = "udp") -> None:
        self.kam = kam
        self.transport = transport
        if transport == "tcp":
            self.sock = socket.create_connection(kam.address, timeout=3)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((HOST, 0))
            self.sock.connect(kam.address)
            self.sock.settimeout(3)
        self.port = self.sock.getsockname()[1]
        self._buffer = b""
        self.call_id = f"{secrets.token_hex(6)}@{HOST}"
        self.cseq = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, message: str) -> None:
        self.sock.sendall(message.encode())

    def receive(self) -> str:
        """One SIP message (framed by Content-Length on TCP)."""
        if self.transport == "udp":
            return self.sock.recv(65535).decode()
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self.sock.recv(65535)
        head, _, rest = self._buffer.partition(b"\r\n\r\n")
        match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        length = int(match.group(1)) if match else 0
        while len(rest) < length:
            rest += self.sock.recv(65535)
        self._buffer = rest[length:]
        return (head + b"\r\n\r\n" + rest[:length]).decode()

    def final_response(self) -> str:
        while True:
            message = self.receive()
            status = int(message.split(" ", 2)[1])
            if status >= 200:
                return message

    def register(
        self,
        user: str,
        password: str,
        *,
        expires: int | None = 60,
        algorithm: str = "MD5",
    ) -> tuple[str, str]:
        """REGISTER, answer the 401 with digest credentials; returns (challenge, final)."""
        challenge = self._send_register(user, expires, authorization=None)
        assert challenge.startswith("SIP/2.0 401"), challenge
        www = header(challenge, "WWW-Authenticate")
        assert www is not None
        final = self._send_register(
            user, expires, authorization=digest_authorization(www, user, password, algorithm)
        )
        return challenge, final

    def _send_register(self, user: str, expires: int | None, authorization: str | None) -> str:
        self.cseq += 1
        lines = [
            f"REGISTER sip:{self.kam.domain} SIP/2.0",
            f"Via: SIP/2.0/{self.transport.upper()} {HOST}:{self.port}"
            f";branch=z9hG4bK{secrets.token_hex(6)};rport",
            "Max-Forwards: 70",
            f"From: <sip:{user}@{self.kam.domain}>;tag={secrets.token_hex(4)}",
            f"To: <sip:{user}@{self.kam.domain}>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} REGISTER",
            f"Contact: <sip:{user}@{HOST}:{self.port};transport={self.transport}>",
            "User-Agent: raw-ua",
        ]
        if expires is not None:
            lines.append(f"Expires: {expires}")
        if authorization:
            lines.append(f"Authorization: {authorization}")
        self.send("\r\n".join([*lines, "Content-Length: 0", "", ""]))
        return self.final_response()


class Caller:
    """Sends INVITEs through the provider from a UDP socket, as some far-end caller."""

    def __init__(self, kam: Kamailio) -> None:
        self.kam = kam
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(3)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    def invite(self, user: str) -> None:
        lines = [
            f"INVITE sip:{user}@{self.kam.domain} SIP/2.0",
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch=z9hG4bK{secrets.token_hex(6)};rport",
            "Max-Forwards: 70",
            f"From: <sip:carol@example.test>;tag={secrets.token_hex(4)}",
            f"To: <sip:{user}@{self.kam.domain}>",
            f"Call-ID: {secrets.token_hex(6)}@{HOST}",
            "CSeq: 1 INVITE",
            f"Contact: <sip:carol@{HOST}:{self.port}>",
            "Content-Length: 0",
        ]
        self.sock.sendto("\r\n".join([*lines, "", ""]).encode(), self.kam.address)

    def final_response(self) -> str:
        while True:
            message = self.sock.recv(65535).decode()
            if status_of(message) >= 200:
                return message


def header(message: str, name: str) -> str | None:
    match = re.search(rf"(?im)^{re.escape(name)}:\s*(.*?)\r?$", message)
    return match.group(1) if match else None


def digest_authorization(www: str, user: str, password: str, algorithm: str) -> str:
    """RFC 7616 client side, MD5 or SHA-256, qop=auth when offered."""

    def h(text: str) -> str:
        algo = hashlib.sha256 if algorithm == "SHA-256" else hashlib.md5
        return algo(text.encode()).hexdigest()

    params = {k: v1 or v2 for k, v1, v2 in re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]*))', www)}
    realm, nonce = params["realm"], params["nonce"]
    uri = "sip:" + realm
    ha1 = h(f"{user}:{realm}:{password}")
    ha2 = h(f"REGISTER:{uri}")
    auth = f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}"'
    if "qop" in params:
        cnonce = secrets.token_hex(8)
        response = h(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}")
        auth += f', qop=auth, nc=00000001, cnonce="{cnonce}"'
    else:
        response = h(f"{ha1}:{nonce}:{ha2}")
    return auth + f', response="{response}", algorithm={algorithm}'


def reply_to(request: str, status: str, *, to_tag: str) -> str:
    """A response copying Via, From, To (+tag), Call-ID and CSeq (RFC 3261 §8.2.6)."""
    copied = [
        line + (f";tag={to_tag}" if line.lower().startswith("to:") else "")
        for line in request.split("\r\n\r\n", 1)[0].split("\r\n")[1:]
        if line.lower().startswith(("via:", "from:", "to:", "call-id:", "cseq:"))
    ]
    return "\r\n".join([f"SIP/2.0 {status}", *copied, "Content-Length: 0", "", ""])


def status_of(message: str) -> int:
    return int(message.split(" ", 2)[1])


# -- parsing (no peers) --------------------------------------------------------------------


def test_split_contacts_keeps_commas_inside_quotes_and_brackets() -> None:
    value = '"Doe, J" <sip:a@h;x=1,2>;expires=30, <sip:b@h>;expires=0'
    assert split_contacts(value) == ('"Doe, J" <sip:a@h;x=1,2>;expires=30', "<sip:b@h>;expires=0")
    assert contact_param_int('"Doe, J" <sip:a@h;expires=5>;expires=30', "expires") == 30


def test_register_log_pairs_each_reply_with_its_request() -> None:
    text = (
        " 1(1) NOTICE: <script>: SIPIS-REG\ttime=1.5\tcall_id=c1\tcseq=1 REGISTER\tfrom_user=alice"
        "\tto_user=alice\ttransport=udp\tsrc=127.0.0.1:4000\texpires=0\tauth_user=<null>"
        "\tauthorization=0\tuser_agent=ua\tcontact=<sip:alice@127.0.0.1:4000>\n"
        " 1(1) NOTICE: <script>: SIPIS-REGREPLY\ttime=1.6\tcall_id=c1\tcseq=1 REGISTER"
        "\tstatus=200\tmin_expires=<null>\twww_authenticate=<null>\tcontact=<null>\n"
    )
    [entry] = parse_register_log(text)
    assert entry.status == 200
    assert entry.is_deregister
    assert entry.source == ("127.0.0.1", 4000)
    assert entry.reply_contacts == ()


# -- Kamailio ------------------------------------------------------------------------------


@pytest.mark.kamailio
@needs_sipp
def test_sipp_registers_alice_and_location_shows_the_contact(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    done, trace, port = sipp_register(
        kamailio, tmp_path, user="alice", password="alice-secret-pw", expires=120, final=200
    )
    assert done.returncode == 0, done.stdout + done.stderr + trace

    [binding] = kamailio.location("alice")
    assert binding.contact == f"sip:alice@{HOST}:{port};transport=UDP"
    assert binding.expires is not None and 110 <= binding.expires <= 120
    assert binding.transport == "udp"
    assert binding.user_agent == "sipp-peer-test"
    assert binding.received is None
    assert kamailio.registered_users() == 1

    challenged, accepted = kamailio.register_log()
    assert (challenged.authorization, challenged.status) == (False, 401)
    assert challenged.www_authenticate is not None
    assert 'realm="sip.test"' in challenged.www_authenticate
    assert "algorithm=MD5" in challenged.www_authenticate
    assert 'qop="auth"' in challenged.www_authenticate
    assert (accepted.authorization, accepted.auth_user, accepted.status) == (True, "alice", 200)
    assert accepted.source == (HOST, port)
    assert (accepted.transport, accepted.expires_header, accepted.granted_expires) == (
        "udp",
        120,
        120,
    )


@pytest.mark.kamailio
@needs_sipp
def test_deregister_with_expires_zero_is_logged_and_empties_location(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    port = free_port("udp")  # the same Contact both times
    for expires in (300, 0):
        done, trace, _ = sipp_register(
            kamailio,
            tmp_path,
            user="bob",
            password="bob-secret-pw",
            expires=expires,
            final=200,
            port=port,
        )
        assert done.returncode == 0, done.stdout + done.stderr + trace

    assert kamailio.location("bob") == []
    assert kamailio.registered_users() == 0
    last = kamailio.register_log()[-1]
    assert last.is_deregister and last.expires_header == 0 and last.status == 200


@pytest.mark.kamailio
@needs_sipp
def test_wrong_password_is_challenged_again_or_forbidden(
    kamailio_factory: KamailioFactory, tmp_path: Path
) -> None:
    rechallenging = kamailio_factory()
    done, trace, _ = sipp_register(
        rechallenging, tmp_path, user="alice", password="wrong", expires=60, final=401
    )
    assert done.returncode == 0, done.stdout + done.stderr + trace
    assert [(e.authorization, e.status) for e in rechallenging.register_log()] == [
        (False, 401),
        (True, 401),
    ]
    assert rechallenging.location("alice") == []

    forbidding = kamailio_factory(wrong_password_reply=403)
    done, trace, _ = sipp_register(
        forbidding, tmp_path, user="alice", password="wrong", expires=60, final=403
    )
    assert done.returncode == 0, done.stdout + done.stderr + trace


@pytest.mark.kamailio
@needs_sipp
def test_min_expires_answers_423_with_min_expires_after_the_challenge(
    kamailio_factory: KamailioFactory, tmp_path: Path
) -> None:
    kam = kamailio_factory(min_expires=60)
    done, trace, _ = sipp_register(
        kam, tmp_path, user="alice", password="alice-secret-pw", expires=30, final=423
    )
    assert done.returncode == 0, done.stdout + done.stderr + trace
    assert "Min-Expires: 60" in trace
    challenged, refused = kam.register_log()
    assert challenged.status == 401
    assert (refused.status, refused.min_expires) == (423, 60)
    assert kam.location("alice") == []

    # A de-REGISTER (Expires: 0) is below min_expires too, but is allowed.
    ua = RawUA(kam)
    try:
        _, final = ua.register("alice", "alice-secret-pw", expires=0)
    finally:
        ua.close()
    assert status_of(final) == 200


@pytest.mark.kamailio
def test_max_expires_caps_and_default_expires_fills_in_the_granted_expiry(
    kamailio_factory: KamailioFactory,
) -> None:
    kam = kamailio_factory(max_expires=30, default_expires=20)
    ua = RawUA(kam)
    try:
        _, capped = ua.register("alice", "alice-secret-pw", expires=3600)
        _, defaulted = ua.register("alice", "alice-secret-pw", expires=None)
    finally:
        ua.close()
    assert contact_param_int(header(capped, "Contact") or "", "expires") == 30
    assert contact_param_int(header(defaulted, "Contact") or "", "expires") == 20
    assert [e.granted_expires for e in kam.register_log() if e.status == 200] == [30, 20]


@pytest.mark.kamailio
def test_sha256_challenge_is_sent_and_sha256_credentials_are_accepted(
    kamailio_factory: KamailioFactory,
) -> None:
    # The colon and backslash check the db_text escaping of the password.
    kam = kamailio_factory(algorithm="SHA-256", users={"alice": "pa:ss\\word"})
    ua = RawUA(kam)
    try:
        challenge, final = ua.register("alice", "pa:ss\\word", algorithm="SHA-256")
        _, refused = ua.register("alice", "pa:ss\\word", algorithm="MD5")
    finally:
        ua.close()
    www = header(challenge, "WWW-Authenticate") or ""
    assert "algorithm=SHA-256" in www and 'qop="auth"' in www
    assert status_of(final) == 200
    assert status_of(refused) == 401  # MD5 answer to a SHA-256 provider: challenged again
    assert [b.aor for b in kam.location("alice")] == ["alice"]


@pytest.mark.kamailio
def test_tcp_registration_with_received_gets_invites_over_the_same_connection(
    kamailio_factory: KamailioFactory,
) -> None:
    kam = kamailio_factory(fix_nated_register=True)
    callee = RawUA(kam, "tcp")
    caller = Caller(kam)
    try:
        _, final = callee.register("bob", "bob-secret-pw")
        assert status_of(final) == 200
        [binding] = kam.location("bob")
        assert (binding.transport, binding.socket) == ("tcp", f"tcp:{HOST}:{kam.port}")
        assert binding.received == f"sip:{HOST}:{callee.port};transport=tcp"
        assert kam.register_log()[-1].transport == "tcp"

        caller.invite("bob")
        routed = callee.receive()  # on the connection the REGISTER came over
        assert routed.startswith(f"INVITE sip:bob@{HOST}:{callee.port};transport=tcp ")
        callee.send(reply_to(routed, "486 Busy Here", to_tag="busy"))
        assert status_of(caller.final_response()) == 486
    finally:
        callee.close()
        caller.close()


@pytest.mark.kamailio
def test_restart_keeps_the_port_and_forgets_bindings(kamailio: Kamailio) -> None:
    ua = RawUA(kamailio)
    try:
        ua.register("alice", "alice-secret-pw")
        assert len(kamailio.location("alice")) == 1
        port = kamailio.port
        kamailio.restart(min_expires=30)
        assert kamailio.port == port
        assert kamailio.location("alice") == []
        _, final = ua.register("alice", "alice-secret-pw", expires=10)
    finally:
        ua.close()
    assert status_of(final) == 423
    assert kamailio.log_text().count("starting kamailio") == 2
    assert [e.status for e in kamailio.register_log()] == [401, 200, 401, 423]


@pytest.mark.kamailio
def test_remove_drops_the_users_bindings(kamailio: Kamailio) -> None:
    ua = RawUA(kamailio)
    try:
        ua.register("alice", "alice-secret-pw")
    finally:
        ua.close()
    kamailio.remove("alice")
    assert kamailio.location("alice") == []
    kamailio.remove("nobody")  # no error for an unknown user


@pytest.mark.kamailio
def test_invite_is_routed_to_the_registered_contact_with_record_route(
    kamailio: Kamailio,
) -> None:
    callee = RawUA(kamailio)
    caller = Caller(kamailio)
    try:
        callee.register("alice", "alice-secret-pw")
        caller.invite("bob")
        assert status_of(caller.final_response()) == 404

        caller.invite("alice")
        routed = callee.receive()
        assert routed.startswith(f"INVITE sip:alice@{HOST}:{callee.port};transport=udp ")
        assert f"<sip:{HOST}:{kamailio.port};lr" in (header(routed, "Record-Route") or "")
        callee.send(reply_to(routed, "486 Busy Here", to_tag="busy"))
        assert status_of(caller.final_response()) == 486
    finally:
        callee.close()
        caller.close()


# -- DNS -----------------------------------------------------------------------------------


def test_dns_server_answers_naptr_srv_a_and_aaaa_and_nothing_else(
    dns_server_factory: DnsServerFactory,
) -> None:
    server = dns_server_factory(
        [
            NAPTR("example.test", 10, 50, "SIP+D2T", "_sip._tcp.example.test"),
            NAPTR("example.test", 20, 50, "SIP+D2U", "_sip._udp.example.test"),
            SRV("_sip._tcp.example.test", "sip1.example.test", 5070, priority=10, weight=60),
            SRV("_sip._tcp.example.test", "sip2.example.test", 5071, priority=20),
            A("sip1.example.test", "127.0.0.2"),
            A("sip2.example.test", "127.0.0.3"),
            AAAA("sip2.example.test", "::1"),
            CNAME("alias.example.test", "sip1.example.test"),
        ],
        ttl=5,
    )
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [HOST]
    resolver.port = server.port
    resolver.lifetime = 2

    def answer(name: str, rdtype: str) -> list[str]:
        return sorted(r.to_text() for r in resolver.resolve(name, rdtype))

    assert answer("example.test", "NAPTR") == [
        '10 50 "S" "SIP+D2T" "" _sip._tcp.example.test.',
        '20 50 "S" "SIP+D2U" "" _sip._udp.example.test.',
    ]
    assert answer("_sip._tcp.example.test", "SRV") == [
        "10 60 5070 sip1.example.test.",
        "20 0 5071 sip2.example.test.",
    ]
    assert answer("sip1.example.test", "A") == ["127.0.0.2"]
    assert answer("sip2.example.test", "AAAA") == ["::1"]
    assert answer("alias.example.test", "A") == ["127.0.0.2"]
    assert resolver.resolve("sip1.example.test", "A").rrset.ttl == 5  # type: ignore[union-attr]

    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("nothere.example.test", "A")
    with pytest.raises(dns.resolver.NXDOMAIN):  # never forwarded upstream
        resolver.resolve("example.com", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("sip1.example.test", "AAAA")

    # Over TCP too (large answers, RFC 3263 clients that fall back).
    query = dns.message.make_query("_sip._tcp.example.test", "SRV")
    response = dns.query.tcp(query, HOST, port=server.port, timeout=2)
    assert response.rcode() == dns.rcode.NOERROR and len(response.answer[0]) == 2

    assert ("NAPTR", "example.test") in server.queries()


def test_dns_server_can_swap_its_zone_on_the_same_port(
    dns_server_factory: DnsServerFactory,
) -> None:
    server = dns_server_factory([A("sip.example.test", "127.0.0.2")])
    port = server.port
    server.replace_records([A("sip.example.test", "127.0.0.4")])
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [HOST]
    resolver.port = port
    assert [r.to_text() for r in resolver.resolve("sip.example.test", "A")] == ["127.0.0.4"]


def test_contact_param_is_read_after_the_uri_not_inside_a_quoted_instance() -> None:
    """A +sip.instance value "<urn:…>" holds a ">" too: params are read after the URI's."""
    from tests.peers.kamailio import contact_param_int

    value = '<sip:t@127.0.0.1:5;transport=udp>;expires=4;+sip.instance="<urn:uuid:1>"'
    assert contact_param_int(value, "expires") == 4
    assert contact_param_int("sip:t@127.0.0.1;expires=9", "expires") == 9
