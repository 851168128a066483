"""``webhook``: POST each batch as JSON to a URL of the user's choosing.

Body: ``{"batch": [event, ...], "sentAt": "<iso>"}`` (Segment's batch shape), with the
configured headers. Classification is the shared table of ``_http``; the values of the
configured headers (tokens, say) are scrubbed from a retry's or dead letter's detail, where
an error that echoes the request would show them.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Literal

import orjson
from pydantic import Field

from tagrelay.config.common import ForwarderConfigBase
from tagrelay.forwarders._base import Forwarder
from tagrelay.forwarders._http import HttpRequest, classify_status, scrub_secrets, send
from tagrelay.model import Dead, Event, Outcome, Retry, iso


class WebhookConfig(ForwarderConfigBase):
    """POST batches of events as JSON to an HTTP endpoint."""

    type: Literal["webhook"] = Field(description="Forwarder type.", examples=["webhook"])
    endpoint: str = Field(
        pattern=r"^https?://",
        description="URL the batches are POSTed to.",
        examples=["https://hooks.example.com/tagrelay"],
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra request headers, e.g. an Authorization token (never logged).",
        examples=[{"Authorization": "Bearer ${HOOK_TOKEN}"}],
    )
    timeout_secs: float = Field(
        10.0, gt=0, le=300, description="Per-request timeout.", examples=[10.0]
    )


def build_request(config: WebhookConfig, events: list[Event], now: datetime) -> HttpRequest:
    """The exact request for one batch (pure)."""
    body = orjson.dumps({"batch": events, "sentAt": iso(now)})
    headers = {"Content-Type": "application/json", "User-Agent": "tagrelay"}
    headers.update(config.headers)
    return HttpRequest("POST", config.endpoint, headers, body)


class WebhookForwarder(Forwarder[WebhookConfig]):
    config_model = WebhookConfig

    async def deliver(self, events: list[Event]) -> Outcome:
        request = build_request(self.config, events, datetime.now(UTC))
        response = await send(self.context.http, request, self.config.timeout_secs)
        outcome = response if isinstance(response, Retry) else classify_status(response)
        if isinstance(outcome, Retry | Dead):
            return replace(
                outcome, detail=scrub_secrets(outcome.detail, self.config.headers.values())
            )
        return outcome
