"""The store's records: frozen, secrets out of repr, registration states checked."""

from __future__ import annotations

import attrs
import pytest

from sipis.store.models import (
    REGISTRATION_STATES,
    InstanceRecord,
    RegistrationStatus,
    redacted_token,
)

PASSWORD = "hunter2-very-secret"
PUSH_TOKEN = "a1b2c3d4e5f6" * 5


def make_record(**changes: object) -> InstanceRecord:
    rec = InstanceRecord(
        id="inst-1", secret_verifier=b"\x01" + b"v" * 32, app="com.example.phone",
        aor="sip:alice@sip.example.net", username="alice", password=PASSWORD,
        registrar=None, outbound_proxy=None, expires=600, push_provider="apns",
        push_token=PUSH_TOKEN, push_environment="production", contact_token="ct-1",
        instance_urn="urn:uuid:00000000-0000-4000-8000-000000000001", lifetime=3600,
        created_at=1000.0, last_heard_at=1000.0, expires_at=4600.0,
    )
    return attrs.evolve(rec, **changes)  # type: ignore[arg-type]


def test_repr_of_a_record_hides_password_and_push_token() -> None:
    """A record logged by accident shows neither the SIP password nor the push token."""
    text = repr(make_record())
    assert PASSWORD not in text
    assert PUSH_TOKEN not in text
    assert PUSH_TOKEN[:12] not in text
    assert "alice" in text  # the rest is there


HA1_MD5 = "0123456789abcdef0123456789abcdef"


def test_repr_of_a_record_hides_the_device_ha1s() -> None:
    """The device HA1s are password equivalents: never in repr (the public realm may be)."""
    rec = make_record(device_realm="sipis.example.org", device_ha1={"MD5": HA1_MD5})
    text = repr(rec)
    assert HA1_MD5 not in text
    assert HA1_MD5[:12] not in text
    assert "sipis.example.org" in text


def test_record_without_device_ha1s_has_empty_realm_and_mapping() -> None:
    """Records built the old way get realm "" and no HA1s (no device can register)."""
    rec = make_record()
    assert rec.device_realm == ""
    assert rec.device_ha1 == {}


def test_device_ha1_mapping_is_a_read_only_copy() -> None:
    """Neither the caller's dict nor the record's mapping can change the stored HA1s."""
    given = {"MD5": HA1_MD5}
    rec = make_record(device_ha1=given)
    given["MD5"] = "changed"
    assert rec.device_ha1 == {"MD5": HA1_MD5}
    with pytest.raises(TypeError):
        rec.device_ha1["MD5"] = "x"  # type: ignore[index]
    assert rec == make_record(device_ha1={"MD5": HA1_MD5})
    assert rec != make_record(device_ha1={"MD5": "f" * 32})
    assert hash(rec) == hash(make_record(device_ha1={"MD5": HA1_MD5}))  # still hashable


def test_new_record_starts_registering() -> None:
    """Without a status, a record is 'registering' with nothing else known."""
    assert make_record().registration == RegistrationStatus(
        "registering", None, None, None, None)


def test_records_are_frozen_and_compare_by_value() -> None:
    """Records are immutable values: change them with attrs.evolve."""
    rec = make_record()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        rec.password = "x"  # type: ignore[misc]
    assert rec == make_record()
    assert attrs.evolve(rec, password="other") != rec


@pytest.mark.parametrize("state", REGISTRATION_STATES)
def test_every_registration_state_is_accepted(state: str) -> None:
    """Each state of REGISTRATION_STATES makes a valid status."""
    assert RegistrationStatus(state=state).state == state


def test_unknown_registration_state_is_refused() -> None:
    """A state outside the list is a programming error, caught at construction."""
    with pytest.raises(ValueError, match="state"):
        RegistrationStatus(state="dancing")


def test_redacted_token_shows_prefix_and_length_only() -> None:
    """A long token is shown as its first 6 characters and its length."""
    token = "0123456789abcdef" * 4
    assert redacted_token(token) == "012345…(64)"
    assert token[6:12] not in redacted_token(token)


def test_redacted_short_token_shows_only_its_length() -> None:
    """A short token would be half-revealed by 6 characters: only its length is shown."""
    assert redacted_token("abcdefghij") == "…(10)"
    assert redacted_token("") == "…(0)"
