"""The spool's tests run with and without encryption at rest where what they check must
hold both ways (``cipher``)."""

from __future__ import annotations

import pytest

from tagrelay.crypto import Keyring, generate_key
from tagrelay.spool.encryption import PLAINTEXT, PayloadCipher


@pytest.fixture(params=["plaintext", "encrypted"])
def cipher(request: pytest.FixtureRequest) -> PayloadCipher:
    """No keys, then one key (``encryption.keys``)."""
    if request.param == "plaintext":
        return PLAINTEXT
    return PayloadCipher(Keyring.from_texts([generate_key()]))
