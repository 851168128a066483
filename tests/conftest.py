"""Fixtures shared by every test package (helpers live in ``tests.support``)."""

from tests.support import context, recorder, relay

__all__ = ["context", "recorder", "relay"]
