"""api.schemas: validation of create/PATCH bodies and serialisation of instance state."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipis.api.schemas import (
    MAX_LIFETIME_SECONDS,
    ExpiresPolicy,
    FieldError,
    Invalid,
    MalformedBody,
    aor_domain,
    created_body,
    decode_json,
    instance_body,
    parse_duration,
    parse_sip_uri,
    rfc3339,
    validate_new_instance,
    validate_update,
)
from sipis.instances import Created, DeviceInfo, InstanceUpdate, NewInstance
from tests.api.fakes import START_TIME, make_record

POLICY = ExpiresPolicy(default=600, minimum=60, maximum=7200)
APNS_TOKEN = "a3f1" * 16
PASSWORD = "s3cret pass!"


def body(**changes: Any) -> dict[str, Any]:
    """A valid create body; `changes` maps dotted paths to new values (None deletes)."""
    base: dict[str, Any] = {
        "app": "com.example.phone",
        "sip": {
            "aor": "sip:alice@sip.example.net",
            "username": "alice",
            "password": PASSWORD,
            "registrar": "sip:sip.example.net;transport=tcp",
            "outbound_proxy": None,
            "expires": 600,
        },
        "push": {"provider": "apns", "token": APNS_TOKEN, "environment": "production"},
        "lifetime": "5d",
    }
    result = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = result
        for parent in parents:
            target = target[parent]
        if value is _DELETE:
            del target[leaf]
        else:
            target[leaf] = value
    return result


_DELETE = object()


def errors_of(result: object) -> dict[str, str]:
    assert isinstance(result, Invalid), result
    assert result.errors
    return {error.field: error.message for error in result.errors}


def new_instance(b: object) -> NewInstance:
    result = validate_new_instance(b, expires=POLICY)
    assert isinstance(result, NewInstance), result
    return result


# --- create: the good path ------------------------------------------------------------------


def test_a_full_valid_body_becomes_a_new_instance() -> None:
    """Every documented field is carried over, lifetime converted to seconds."""
    new = new_instance(body())
    assert new == NewInstance(
        app="com.example.phone",
        aor="sip:alice@sip.example.net",
        username="alice",
        password=PASSWORD,
        registrar="sip:sip.example.net;transport=tcp",
        outbound_proxy=None,
        expires=600,
        push_provider="apns",
        push_token=APNS_TOKEN,
        push_environment="production",
        lifetime=5 * 86400,
    )


def test_a_minimal_body_gets_the_documented_defaults() -> None:
    """username from the AOR user, expires from policy, APNs production, lifetime None."""
    b = {
        "app": "com.example.phone",
        "sip": {"aor": "sips:bob@example.org", "password": "pw"},
        "push": {"provider": "apns", "token": APNS_TOKEN},
    }
    new = new_instance(b)
    assert new.username == "bob"
    assert new.expires == POLICY.default
    assert new.push_environment == "production"
    assert new.lifetime is None
    assert new.registrar is None and new.outbound_proxy is None


def test_the_default_username_is_the_unescaped_aor_user() -> None:
    """A percent-escaped AOR user is the digest username after unescaping (RFC 3261 §19.1.2)."""
    new = new_instance(body(sip__aor="sip:alice%40corp@example.org", sip__username=None))
    assert new.username == "alice@corp"


def test_fcm_has_no_environment() -> None:
    """FCM tokens have no sandbox: the environment is None."""
    new = new_instance(body(push={"provider": "fcm", "token": "fcm:token-123_ABC"}))
    assert new.push_provider == "fcm"
    assert new.push_environment is None


def test_nulls_mean_absent_for_optional_create_fields() -> None:
    """null for username/registrar/outbound_proxy/expires/environment/lifetime is the default."""
    new = new_instance(
        body(
            sip__username=None,
            sip__registrar=None,
            sip__expires=None,
            push__environment=None,
            lifetime=None,
        )
    )
    assert (new.username, new.registrar, new.expires, new.push_environment, new.lifetime) == (
        "alice",
        None,
        600,
        "production",
        None,
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(3600, 3600), ("5d", 432000), ("36h", 129600), ("1d12h", 129600), ("90m", 5400),
     ("1w", 604800), ("30s", 30)],
)
def test_lifetime_is_seconds_or_a_duration_string(value: object, seconds: int) -> None:
    """Integers are seconds; strings use w/d/h/m/s units, combinable."""
    assert new_instance(body(lifetime=value)).lifetime == seconds


def test_an_ipv6_registrar_and_outbound_proxy_are_accepted() -> None:
    """Bracketed IPv6 hosts with ports and params are valid SIP URIs."""
    new = new_instance(
        body(sip__registrar="sip:[2001:db8::1]:5061;transport=tls",
             sip__outbound_proxy="sip:proxy.example.net;lr")
    )
    assert new.registrar == "sip:[2001:db8::1]:5061;transport=tls"
    assert new.outbound_proxy == "sip:proxy.example.net;lr"


def test_expires_may_be_anywhere_within_the_policy_bounds() -> None:
    """The registrar min/max are inclusive."""
    assert new_instance(body(sip__expires=60)).expires == 60
    assert new_instance(body(sip__expires=7200)).expires == 7200


# --- create: errors -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [[], "x", 3, None, True])
def test_a_body_that_is_not_an_object_is_one_root_error(value: object) -> None:
    """The whole-body error has the empty field path."""
    assert errors_of(validate_new_instance(value, expires=POLICY)) == {
        "": "must be a JSON object"
    }


def test_every_missing_required_field_is_reported_at_once() -> None:
    """Missing app, sip, push: three errors in one answer."""
    assert set(errors_of(validate_new_instance({}, expires=POLICY))) == {"app", "sip", "push"}


def test_missing_nested_required_fields_are_reported_with_dotted_paths() -> None:
    """sip.aor, sip.password, push.provider, push.token are required."""
    result = validate_new_instance({"app": "com.example.phone", "sip": {}, "push": {}},
                                   expires=POLICY)
    assert errors_of(result) == {
        "sip.aor": "is required",
        "sip.password": "is required",
        "push.provider": "is required",
        "push.token": "is required",
    }


def test_unknown_keys_at_any_level_are_errors() -> None:
    """Typos are caught rather than silently ignored."""
    b = body()
    b["lifetme"] = "5d"
    b["sip"]["pasword"] = "x"
    b["push"]["topic"] = "x"
    assert errors_of(validate_new_instance(b, expires=POLICY)) == {
        "lifetme": "unknown field",
        "sip.pasword": "unknown field",
        "push.topic": "unknown field",
    }


def test_many_bad_fields_give_many_errors() -> None:
    """Validation does not stop at the first error."""
    b = body(
        app="not an app",
        sip__aor="tel:+123",
        sip__password="",
        sip__expires=10,
        push__provider="webpush",
        push__token="has space",
        lifetime="forever",
    )
    assert set(errors_of(validate_new_instance(b, expires=POLICY))) == {
        "app",
        "sip.aor",
        "sip.password",
        "sip.expires",
        "push.provider",
        "push.token",
        "lifetime",
    }


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("sip", "sip:alice@example.org", "sip"),
        ("push", ["apns"], "push"),
        ("app", 42, "app"),
        ("sip__aor", 1, "sip.aor"),
        ("sip__username", 1, "sip.username"),
        ("sip__password", None, "sip.password"),
        ("sip__password", 12345, "sip.password"),
        ("sip__registrar", {"host": "x"}, "sip.registrar"),
        ("sip__expires", "600", "sip.expires"),
        ("sip__expires", 600.0, "sip.expires"),
        ("sip__expires", True, "sip.expires"),
        ("push__provider", None, "push.provider"),
        ("push__token", None, "push.token"),
        ("push__environment", 1, "push.environment"),
        ("lifetime", 3600.5, "lifetime"),
        ("lifetime", True, "lifetime"),
        ("lifetime", [1], "lifetime"),
    ],
)
def test_wrong_types_are_field_errors(path: str, value: object, field: str) -> None:
    """A value of the wrong JSON type is reported on its own path (bool is not an int)."""
    assert field in errors_of(validate_new_instance(body(**{path: value}), expires=POLICY))


@pytest.mark.parametrize(
    "app",
    ["", "phone", "com..example", ".com.example", "com.example.", "com.exa mple", "x." * 200,
     "com/example"],
)
def test_app_must_be_a_reverse_dns_id_of_at_most_255_chars(app: str) -> None:
    """Bundle ids and application ids: dotted segments of letters, digits, _ and -."""
    assert "app" in errors_of(validate_new_instance(body(app=app), expires=POLICY))


@pytest.mark.parametrize("app", ["com.example.phone", "org.linphone.Phone-2", "a_b.c"])
def test_real_app_ids_are_accepted(app: str) -> None:
    """Typical iOS and Android ids pass."""
    assert new_instance(body(app=app)).app == app


@pytest.mark.parametrize(
    ("aor", "message"),
    [
        ("alice@example.org", "must be a sip: or sips: URI"),
        ("tel:+15551234", "must be a sip: or sips: URI"),
        ("sip:example.org", "must have a user part (sip:user@host)"),
        ("sip:alice:pw@example.org", "must not contain a password (send it in sip.password)"),
        ("sip:alice@example.org?subject=hi", "must not contain URI headers"),
        ("sip:alice@exa_mple.org", "has an invalid host"),
        ("sip:alice@example.org:0", "has an invalid port"),
        ("sip:alice@example.org:99999", "has an invalid port"),
        ("sip:alice@example.org:", "has an invalid port"),
        ("sip:alice@[2001:db8::zz]", "has an invalid host"),
        ("sip:alice@999.1.1.1", "has an invalid host"),
        ("sip:al ice@example.org", "must not contain spaces or non-ASCII characters"),
        ("sip:alicé@example.org", "must not contain spaces or non-ASCII characters"),
        ("sip:al<ice@example.org", "has an invalid user part"),
        ("sip:alice@example.org;=x", "has an invalid parameter"),
        ("sip:" + "a" * 2050 + "@example.org", "must be at most 2048 characters"),
    ],
)
def test_the_aor_must_be_a_sip_uri_with_user_and_host(aor: str, message: str) -> None:
    """Each way an AOR can be wrong has its own message."""
    assert errors_of(validate_new_instance(body(sip__aor=aor), expires=POLICY)) == {
        "sip.aor": message
    }


def test_a_bad_registrar_and_outbound_proxy_are_reported_separately() -> None:
    """Both are optional, but when given must be sip(s) URIs."""
    result = validate_new_instance(
        body(sip__registrar="http://example.org", sip__outbound_proxy="sip:"), expires=POLICY
    )
    assert set(errors_of(result)) == {"sip.registrar", "sip.outbound_proxy"}


@pytest.mark.parametrize("password", ["", "a\r\nVia: x", "nul\x00", "a" * 257, "line\n"])
def test_the_password_is_non_empty_at_most_256_and_has_no_cr_lf_nul(password: str) -> None:
    """CR/LF/NUL could end up in a SIP header; the length is capped."""
    assert "sip.password" in errors_of(
        validate_new_instance(body(sip__password=password), expires=POLICY)
    )


def test_a_lone_surrogate_is_not_a_password() -> None:
    """JSON can carry a lone surrogate escape, which UTF-8 (and so digest auth) cannot encode."""
    body_with_surrogate = decode_json(b'{"sip": {"password": "a\\ud800"}}')
    assert isinstance(body_with_surrogate, dict)
    b = body(sip__password=body_with_surrogate["sip"]["password"])
    assert errors_of(validate_new_instance(b, expires=POLICY)) == {
        "sip.password": "must be valid Unicode"
    }


def test_the_password_may_hold_any_other_unicode() -> None:
    """Spaces, quotes, non-ASCII letters are fine in a password."""
    assert new_instance(body(sip__password='p "w" ñ €')).password == 'p "w" ñ €'


@pytest.mark.parametrize("token", ["", "tab\there", "é" * 10, "x" * 4097, "sp ace"])
def test_the_push_token_is_non_empty_printable_ascii_at_most_4096(token: str) -> None:
    """Tokens are opaque but always visible ASCII."""
    assert "push.token" in errors_of(
        validate_new_instance(body(push__token=token), expires=POLICY)
    )


def test_the_environment_is_production_or_sandbox_for_apns_only() -> None:
    """Anything else, or any environment for FCM, is an error."""
    assert errors_of(
        validate_new_instance(body(push__environment="staging"), expires=POLICY)
    ) == {"push.environment": "must be one of: production, sandbox"}
    assert new_instance(body(push__environment="sandbox")).push_environment == "sandbox"
    fcm = body(push={"provider": "fcm", "token": "t", "environment": "production"})
    assert errors_of(validate_new_instance(fcm, expires=POLICY)) == {
        "push.environment": "applies to apns only"
    }


@pytest.mark.parametrize("expires", [0, 59, 7201, -1, 10**30])
def test_expires_outside_the_policy_bounds_is_an_error(expires: int) -> None:
    """The message names the bounds."""
    assert errors_of(validate_new_instance(body(sip__expires=expires), expires=POLICY)) == {
        "sip.expires": "must be between 60 and 7200"
    }


@pytest.mark.parametrize(
    "lifetime", [0, -5, "0d", "", "5", "5 d", "5D", "d", "-1d", "1.5d", MAX_LIFETIME_SECONDS + 1,
                 "9999999999d", 10**100]
)
def test_lifetime_must_be_positive_and_well_formed(lifetime: object) -> None:
    """Zero, negative, unit-less strings, odd units and absurd sizes are refused."""
    assert "lifetime" in errors_of(validate_new_instance(body(lifetime=lifetime), expires=POLICY))


def test_an_explicit_username_must_be_a_clean_string() -> None:
    """An empty or CR/LF-bearing username is refused."""
    assert "sip.username" in errors_of(
        validate_new_instance(body(sip__username="a\nb"), expires=POLICY)
    )
    assert "sip.username" in errors_of(
        validate_new_instance(body(sip__username=""), expires=POLICY)
    )


def test_an_aor_user_that_unescapes_to_a_newline_cannot_be_the_default_username() -> None:
    """%0D%0A in the AOR user is a valid URI but not a usable digest username."""
    result = validate_new_instance(
        body(sip__aor="sip:a%0D%0Ab@example.org", sip__username=_DELETE), expires=POLICY
    )
    assert errors_of(result) == {"sip.aor": "has a user part that cannot be a username"}


# --- PATCH ----------------------------------------------------------------------------------


def test_an_empty_patch_is_a_valid_empty_update() -> None:
    """{} only counts as heard from the device."""
    assert validate_update({}) == InstanceUpdate()


def test_a_patch_may_change_token_environment_password_and_lifetime() -> None:
    """All four fields at once."""
    result = validate_update(
        {"push": {"token": "newtoken", "environment": "sandbox"},
         "sip": {"password": "new pw"}, "lifetime": "36h"},
        push_provider="apns",
    )
    assert result == InstanceUpdate(
        push_token="newtoken", push_environment="sandbox", password="new pw", lifetime=129600
    )


def test_a_patch_with_unknown_or_unchangeable_fields_is_refused() -> None:
    """The AOR, app and provider cannot be changed by PATCH; every culprit is named."""
    result = validate_update(
        {"app": "x.y", "sip": {"aor": "sip:a@b", "password": "ok"}, "push": {"provider": "fcm"}}
    )
    assert errors_of(result) == {
        "app": "unknown field",
        "sip.aor": "unknown field",
        "push.provider": "unknown field",
    }


def test_a_patch_with_null_or_bad_values_reports_every_field() -> None:
    """null cannot reset a field; bad values are checked like on create."""
    result = validate_update(
        {"push": {"token": None, "environment": "dev"}, "sip": {"password": "a\r"},
         "lifetime": 0}
    )
    assert set(errors_of(result)) == {
        "push.token", "push.environment", "sip.password", "lifetime"
    }


def test_a_patch_environment_is_refused_for_an_fcm_instance() -> None:
    """The provider of the instance decides whether an environment applies."""
    result = validate_update({"push": {"environment": "sandbox"}}, push_provider="fcm")
    assert errors_of(result) == {"push.environment": "applies to apns only"}


@pytest.mark.parametrize("value", [[], "x", None, 1])
def test_a_patch_body_must_be_an_object(value: object) -> None:
    """Same root error as on create."""
    assert errors_of(validate_update(value)) == {"": "must be a JSON object"}


def test_patch_sub_objects_must_be_objects() -> None:
    """push and sip in a PATCH must be objects."""
    assert errors_of(validate_update({"push": "t", "sip": 1})) == {
        "push": "must be a JSON object",
        "sip": "must be a JSON object",
    }


# --- JSON decoding --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"{'a': 1}", b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}',
     b'{"a": 1e999}', b'{"a": 1, "a": 2}', b"\xff\xfe{}", b"[" * 100 + b"]" * 100,
     b'{"a": ' + b"9" * 5000 + b"}", b"{} {}"],
)
def test_decode_json_refuses_what_is_not_one_strict_json_value(raw: bytes) -> None:
    """Non-JSON, non-finite numbers, duplicate keys, bad UTF-8, deep nesting, huge ints."""
    with pytest.raises(MalformedBody):
        decode_json(raw)


def test_decode_json_reads_ordinary_json_and_ignores_brackets_in_strings() -> None:
    """Brackets inside strings do not count towards the nesting limit."""
    assert decode_json(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "b": [1, 2.5]}') == {
        "a": "[" * 40,
        "b": [1, 2.5],
    }


def test_decode_json_messages_never_quote_the_body() -> None:
    """A password in a broken body must not come back in the error detail."""
    with pytest.raises(MalformedBody) as info:
        decode_json(b'{"sip": {"password": "hunter2"')
    assert "hunter2" not in str(info.value)


# --- helpers --------------------------------------------------------------------------------


def test_parse_sip_uri_splits_user_host_port_and_params() -> None:
    """The host is lower-cased; IPv6 loses its brackets."""
    parts = parse_sip_uri("SIP:Alice@Example.ORG:5080;transport=tcp;lr")
    assert not isinstance(parts, str)
    assert (parts.scheme, parts.user, parts.host, parts.port, parts.params) == (
        "sip", "Alice", "example.org", 5080, ("transport=tcp", "lr")
    )
    v6 = parse_sip_uri("sips:[2001:DB8::1]")
    assert not isinstance(v6, str) and v6.host == "2001:db8::1" and v6.user is None


def test_aor_domain_is_the_lower_case_host() -> None:
    """The allow-list compares the AOR's host."""
    assert aor_domain("sip:bob@SIP.Example.net;transport=tcp") == "sip.example.net"


def test_parse_duration_units() -> None:
    """w/d/h/m/s add up; anything else is None."""
    assert parse_duration("1w1d1h1m1s") == 694861
    assert parse_duration("1y") is None


def test_next_attempt_is_shown_to_the_millisecond() -> None:
    """Backoff jitter is sub-second: next_attempt_at keeps milliseconds."""
    from sipis.api.schemas import rfc3339_ms

    assert rfc3339_ms(0.1234) == "1970-01-01T00:00:00.123Z"
    assert rfc3339_ms(None) is None


def test_rfc3339_is_utc_with_z() -> None:
    """Whole seconds, UTC, "Z"."""
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(START_TIME + 0.9) == "2026-09-21T14:13:20Z"
    assert rfc3339(None) is None


# --- serialisation --------------------------------------------------------------------------


def test_instance_body_has_the_state_and_no_secret_material() -> None:
    """Password, verifier, contact token and full push token never appear."""
    record, secret = make_record(new_instance(body()), number=7, now=START_TIME)
    out = instance_body(record, record.registration)
    assert out == {
        "id": "inst0007",
        "app": "com.example.phone",
        "aor": "sip:alice@sip.example.net",
        "username": "alice",
        "registrar": "sip:sip.example.net;transport=tcp",
        "outbound_proxy": None,
        "push": {"provider": "apns", "environment": "production",
                 "token": APNS_TOKEN[:6] + "…(64)"},
        "created_at": "2026-09-21T14:13:20Z",
        "last_heard_at": "2026-09-21T14:13:20Z",
        "expires_at": "2026-09-26T14:13:20Z",
        "lifetime": 432000,
        "registration": {
            "state": "registered",
            "expires": 600,
            "last_error": None,
            "next_attempt_at": None,
            "last_registered_at": "2026-09-21T14:13:20Z",
        },
    }
    text = json.dumps(out)
    for forbidden in (PASSWORD, APNS_TOKEN, secret, record.contact_token, "verifier"):
        assert forbidden not in text


def test_created_body_shows_the_secret_once_with_device_details() -> None:
    """SPEC.md 201 body shape."""
    record, secret = make_record(new_instance(body()), number=1, now=START_TIME)
    device = DeviceInfo(registrar="sip:127.0.0.1:5060;transport=tcp", username="inst0001",
                        realm="127.0.0.1")
    out = created_body(Created(record=record, secret=secret), record.registration, device)
    assert out == {
        "id": "inst0001",
        "secret": secret,
        "expires_at": "2026-09-26T14:13:20Z",
        "registration": {"state": "registered", "expires": 600},
        "device": {"registrar": "sip:127.0.0.1:5060;transport=tcp", "username": "inst0001",
                   "realm": "127.0.0.1"},
    }
    assert PASSWORD not in json.dumps(out)


def test_field_errors_serialise_as_field_and_message() -> None:
    """The problem `errors` member shape."""
    assert FieldError("sip.password", "is required").to_json() == {
        "field": "sip.password", "message": "is required"
    }


# --- never raises ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
# Bodies shaped like the real thing, so validation gets deep instead of failing at the root.
shaped = st.fixed_dictionaries(
    {},
    optional={
        "app": json_values,
        "sip": st.fixed_dictionaries(
            {},
            optional={k: json_values | st.text(alphabet="sip:@[];=?%.a1-", max_size=30)
                      for k in ("aor", "username", "password", "registrar",
                                "outbound_proxy", "expires")},
        ),
        "push": st.fixed_dictionaries(
            {},
            optional={"provider": st.sampled_from(["apns", "fcm", "x"]) | json_values,
                      "token": json_values, "environment": json_values},
        ),
        "lifetime": json_values | st.from_regex(r"[0-9]{0,12}[wdhmsx]{0,2}", fullmatch=True),
    },
)


@settings(max_examples=300, deadline=None)
@given(json_values | shaped)
def test_validators_never_raise_on_any_json_value(value: object) -> None:
    """Any JSON value yields a domain object or Invalid with at least one error."""
    for result in (
        validate_new_instance(value, expires=POLICY),
        validate_update(value),
        validate_update(value, push_provider="fcm"),
    ):
        assert isinstance(result, NewInstance | InstanceUpdate | Invalid)
        if isinstance(result, Invalid):
            assert result.errors


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_decode_json_raises_only_malformed_body(raw: bytes) -> None:
    """Any bytes decode or raise MalformedBody, nothing else."""
    with contextlib.suppress(MalformedBody):
        decode_json(raw)
