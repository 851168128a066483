"""The event model (Segment spec) and the outcomes of delivering events."""

from tagrelay.model.event import BROWSER_ID_COOKIES, CLICK_ID_PARAMS, EVENT_TYPES, Event, iso
from tagrelay.model.outcome import Dead, Delivered, Outcome, Retry

__all__ = [
    "BROWSER_ID_COOKIES",
    "CLICK_ID_PARAMS",
    "EVENT_TYPES",
    "Dead",
    "Delivered",
    "Event",
    "Outcome",
    "Retry",
    "iso",
]
