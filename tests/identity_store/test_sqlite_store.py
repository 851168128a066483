"""The SQLite identity store: linking ids into persons (identify, alias, an event with both),
the newest value winning, expiry (ttl_days, click ids after their platform's window),
encryption (no identifier or personal data in the raw file, a wrong key refused, a
plaintext store migrated), forget and export."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from tagrelay.crypto import Keyring, key_id
from tagrelay.errors import IdentityStoreError
from tagrelay.identity_store import IdentityStoreConfig, StoreSettings
from tagrelay.identity_store.record import Observation
from tagrelay.identity_store.sqlite import FILE_NAME, SqliteIdentityStore

DAY_MS = 86_400_000
T0 = 1_780_000_000_000
EMAIL = "Buyer@Example.com"


def key_text() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def store(tmp_path: Path, keys: list[str] | None = None, **config: Any) -> SqliteIdentityStore:
    settings = StoreSettings(
        IdentityStoreConfig(enabled=True, **config),
        tuple(SecretStr(k) for k in keys or []),
    )
    backend = settings.open_backend(tmp_path, writer=True)
    assert isinstance(backend, SqliteIdentityStore)
    return backend


def seen(
    at_ms: int = T0,
    *,
    anonymous_id: str | None = None,
    user_id: str | None = None,
    previous_id: str | None = None,
    user: dict[str, str] | None = None,
    click_ids: dict[str, str] | None = None,
    browser_ids: dict[str, str] | None = None,
) -> Observation:
    return Observation(
        anonymous_id, user_id, previous_id, at_ms, user or {}, click_ids or {}, browser_ids or {}
    )


def raw_files(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(FILE_NAME))


def test_an_event_with_both_ids_links_the_visitor_to_the_user(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record([seen(anonymous_id="anon-1", click_ids={"gclid": "G-1"})], T0)
    s.record([seen(T0 + 1000, user_id="user-42", user={"email": EMAIL})], T0 + 1000)
    (before,) = s.lookup([(None, "user-42")], T0 + 2000)
    assert before is not None and "gclid" not in before.click_ids  # not linked yet
    s.record([seen(T0 + 3000, anonymous_id="anon-1", user_id="user-42")], T0 + 3000)
    (profile,) = s.lookup([(None, "user-42")], T0 + 4000)
    assert profile is not None
    assert profile.click_ids["gclid"] == ("G-1", T0)
    assert profile.user["email"] == EMAIL
    assert profile.external_id == "user-42"
    (by_visitor,) = s.lookup([("anon-1", None)], T0 + 4000)
    assert by_visitor == profile
    assert s.stats()["persons"] == 1


def test_an_alias_links_the_previous_id(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record(
        [seen(anonymous_id="anon-7", user={"email": EMAIL}, browser_ids={"fbp": "fb.1.1.2"})], T0
    )
    s.record([seen(T0 + 10, user_id="user-7", previous_id="anon-7")], T0 + 10)
    (profile,) = s.lookup([(None, "user-7")], T0 + 20)
    assert profile is not None
    assert profile.user == {"email": EMAIL}
    assert profile.browser_ids == {"fbp": "fb.1.1.2"}
    # A later alias from that user id to a new one follows the person along.
    s.record([seen(T0 + 30, user_id="user-7b", previous_id="user-7")], T0 + 30)
    (renamed,) = s.lookup([(None, "user-7b")], T0 + 40)
    assert renamed is not None and renamed.user == {"email": EMAIL}
    assert s.stats()["persons"] == 1


def test_the_newest_value_wins_and_an_older_one_does_not_replace_it(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record([seen(T0 + 5000, user_id="u", user={"phone": "+1 650 555 0000"})], T0 + 5000)
    s.record([seen(T0, user_id="u", user={"phone": "+1 650 555 9999"})], T0 + 6000)
    s.record([seen(T0 + 7000, user_id="u", user={"email": EMAIL})], T0 + 7000)
    (profile,) = s.lookup([(None, "u")], T0 + 8000)
    assert profile is not None
    assert profile.user == {"phone": "+1 650 555 0000", "email": EMAIL}


def test_click_ids_expire_after_their_platforms_window(tmp_path: Path) -> None:
    s = store(tmp_path, ttl_days=90, click_id_days={"gclid": 45})
    clicks = {"fbclid": "FB-1", "gclid": "G-1", "ttclid": "T-1"}
    s.record([seen(anonymous_id="a", click_ids=clicks, user={"email": EMAIL})], T0)

    def clicks_at(day: int) -> set[str]:
        (profile,) = s.lookup([("a", None)], T0 + day * DAY_MS)
        return set(profile.click_ids) if profile is not None else set()

    assert clicks_at(6) == {"fbclid", "gclid", "ttclid"}
    assert clicks_at(8) == {"gclid", "ttclid"}  # Meta: 7-day click
    assert clicks_at(29) == {"gclid"}  # TikTok: 28 days
    assert clicks_at(44) == {"gclid"}  # gclid: configured 45 days
    assert clicks_at(46) == set()
    (profile,) = s.lookup([("a", None)], T0 + 89 * DAY_MS)
    assert profile is not None and profile.user == {"email": EMAIL}


def test_a_person_not_seen_for_ttl_days_is_gone_and_purged(tmp_path: Path) -> None:
    s = store(tmp_path, ttl_days=30)
    s.record([seen(anonymous_id="old", user={"email": "old@example.com"})], T0)
    s.record([seen(T0 + 20 * DAY_MS, anonymous_id="new", user={"email": EMAIL})], T0 + 20 * DAY_MS)
    later = T0 + 31 * DAY_MS
    assert s.lookup([("old", None), ("new", None)], later)[0] is None
    assert s.lookup([("old", None), ("new", None)], later)[1] is not None
    assert s.purge(later) == 1
    assert s.stats() == {"persons": 1, "ids": 2}  # "new" and its email
    assert s.export(anonymous_id="old") == {"persons": []}


def test_forget_removes_the_person_and_leaves_others(tmp_path: Path) -> None:
    s = store(tmp_path, keys=[key_text()])
    s.record(
        [
            seen(anonymous_id="anon-1", user_id="user-1", user={"email": EMAIL}),
            seen(anonymous_id="anon-2", user_id="user-2", user={"email": "other@example.com"}),
        ],
        T0,
    )
    exported = s.export(user_id="user-1")["persons"]
    assert len(exported) == 1
    assert exported[0]["user_data"]["email"]["value"] == EMAIL
    assert set(exported[0]["anonymous_ids"]) == {"anon-1"}
    counts = s.forget(email="buyer@example.COM")
    assert counts.as_dict() == {"persons": 1, "ids": 3}  # anon-1, user-1, the email
    assert s.export(user_id="user-1") == {"persons": []}
    assert s.lookup([("anon-1", None)], T0) == [None]
    assert len(s.export(user_id="user-2")["persons"]) == 1
    assert s.forget(user_id="nobody").as_dict() == {"persons": 0, "ids": 0}


def test_forgotten_data_is_gone_from_the_raw_file(tmp_path: Path) -> None:
    # Plaintext, so that the grep can see what is there: erasure overwrites what it deletes.
    s = store(tmp_path)
    s.record(
        [
            seen(anonymous_id="anon-gone", user={"email": "gone@example.com"}),
            seen(anonymous_id="anon-kept", user={"email": "kept@example.com"}),
        ],
        T0,
    )
    assert s.forget(anonymous_id="anon-gone").persons == 1
    s.close()
    data = raw_files(tmp_path)
    assert b"gone@example.com" not in data and b"anon-gone" not in data
    assert b"kept@example.com" in data


def test_the_raw_file_holds_no_identifier_or_personal_data_when_encrypted(
    tmp_path: Path,
) -> None:
    s = store(tmp_path, keys=[key_text()])
    s.record(
        [
            seen(
                anonymous_id="anon-secret-1",
                user_id="user-secret-42",
                user={"email": EMAIL, "phone": "+16505551212", "first_name": "Zoltan"},
                click_ids={"gclid": "GCLIDSECRET"},
                browser_ids={"fbp": "fb.1.123.FBPSECRET"},
            )
        ],
        T0,
    )
    s.close()
    data = raw_files(tmp_path).lower()
    for needle in (EMAIL, "anon-secret-1", "user-secret-42", "6505551212", "zoltan"):
        assert needle.lower().encode() not in data, needle
    for needle in ("GCLIDSECRET", "FBPSECRET"):
        assert needle.lower().encode() not in data, needle


def test_without_encryption_the_file_is_plaintext(tmp_path: Path) -> None:
    # The counterpart of the test above: the grep finds what is there.
    s = store(tmp_path)
    s.record([seen(anonymous_id="anon-plain", user={"email": EMAIL})], T0)
    s.close()
    assert EMAIL.encode() in raw_files(tmp_path)


def test_a_store_under_a_key_no_longer_configured_refuses_to_open(tmp_path: Path) -> None:
    old = key_text()
    s = store(tmp_path, keys=[old])
    s.record([seen(anonymous_id="a", user={"email": EMAIL})], T0)
    s.close()
    other = key_text()
    with pytest.raises(IdentityStoreError) as raised:
        store(tmp_path, keys=[other])
    old_id = key_id(base64.b64decode(old)).hex()
    assert old_id in str(raised.value)
    assert "encryption.keys" in str(raised.value)
    with pytest.raises(IdentityStoreError, match=r"encryption\.keys is empty"):
        store(tmp_path, keys=[])
    # With the old key after a new one (a rotation), it opens and reads.
    s = store(tmp_path, keys=[other, old])
    (profile,) = s.lookup([("a", None)], T0)
    assert profile is not None and profile.user == {"email": EMAIL}


def test_a_plaintext_store_opened_with_a_key_is_encrypted(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.record([seen(anonymous_id="anon-mig", user={"email": EMAIL})], T0)
    s.close()
    key = key_text()
    s = store(tmp_path, keys=[key])
    s.close()
    assert EMAIL.encode() not in raw_files(tmp_path)
    assert b"anon-mig" not in raw_files(tmp_path)
    # Every row is under the key now: without it, the store does not open.
    with pytest.raises(IdentityStoreError):
        store(tmp_path, keys=[])
    s = store(tmp_path, keys=[key])
    (profile,) = s.lookup([("anon-mig", None)], T0)
    assert profile is not None and profile.user == {"email": EMAIL}


def test_reencrypt_moves_every_row_to_the_first_key(tmp_path: Path) -> None:
    old, new = key_text(), key_text()
    s = store(tmp_path, keys=[old])
    s.record(
        [seen(anonymous_id=f"a{i}", user={"email": f"p{i}@example.com"}) for i in range(5)], T0
    )
    s.close()
    s = store(tmp_path, keys=[new, old])
    assert s.reencrypt(limit=2) == 2
    assert s.reencrypt(limit=2) == 2
    assert s.reencrypt() == 1
    assert s.reencrypt() == 0
    s.close()
    s = store(tmp_path, keys=[new])  # the old key can go
    assert s.lookup([("a3", None)], T0)[0] is not None


def test_the_store_file_is_private(tmp_path: Path) -> None:
    store(tmp_path).close()
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o777 == 0o600


def test_a_reader_sees_what_the_writer_committed(tmp_path: Path) -> None:
    settings = StoreSettings(IdentityStoreConfig(enabled=True), ())
    writer = settings.open_backend(tmp_path, writer=True)
    reader = settings.open_backend(tmp_path)
    writer.record([seen(user_id="u", user={"email": EMAIL})], T0)
    (profile,) = reader.lookup([(None, "u")], T0)
    assert profile is not None and profile.user == {"email": EMAIL}
    with pytest.raises(IdentityStoreError):
        settings.open_backend(tmp_path / "elsewhere")


def test_keyring_used_is_the_configured_one(tmp_path: Path) -> None:
    text = key_text()
    settings = StoreSettings(IdentityStoreConfig(enabled=True), (SecretStr(text),))
    ring = settings.keyring()
    assert isinstance(ring, Keyring)
    assert ring.primary_id == key_id(base64.b64decode(text))
    assert "SecretStr" not in repr(settings) and text not in repr(settings)
