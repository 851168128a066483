"""Fixtures shared by every test package (helpers live in ``tests.support``)."""

from tests.support import recorder, relay

__all__ = ["recorder", "relay"]
