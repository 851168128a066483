"""The admin API's key rotation, for ``tagrelay keys rotate`` while the relay runs (the
spool is the relay's, and so is its commit process): ``POST /keys/rotate`` re-encrypts every
row of the spool and the dead letters that is not under the first of ``encryption.keys``
(``SqliteSpool.rotate_keys``: in the background, one small transaction at a time, while
ingest goes on) and answers when it is done::

    {"reencrypted": {"spool": events, "dead_letters": events},
     "left": {"spool.old_key": events, ...}}

A client that goes away does not stop it; a second request while one runs waits for the same
rotation. 409 ``no_keys`` when encryption is off; 503 ``rotation_failed`` when the spool
could not be written or a row not read (what was done stays done: ask again). Counts only:
never a key, never data.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from tagrelay.appkeys import SPOOL
from tagrelay.crypto import CryptoError
from tagrelay.errors import EncryptionKeyError, SpoolUnavailable
from tagrelay.web.ingest import encoded_json_response


def add_keys_routes(admin: web.Application, main_app: web.Application) -> None:
    async def rotate(request: web.Request) -> web.Response:
        try:
            running = main_app[SPOOL].rotate_keys()
        except EncryptionKeyError as exc:
            return encoded_json_response(
                409, orjson.dumps({"error": "no_keys", "message": str(exc)})
            )
        try:
            report = await running
        except (SpoolUnavailable, CryptoError) as exc:
            return encoded_json_response(
                503, orjson.dumps({"error": "rotation_failed", "message": str(exc)})
            )
        return encoded_json_response(200, orjson.dumps(report.as_json()))

    admin.router.add_post("/keys/rotate", rotate)
