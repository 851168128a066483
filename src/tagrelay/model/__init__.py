"""The event model (Segment spec) and the outcomes of delivering events."""

from tagrelay.model.event import CLICK_ID_PARAMS, EVENT_TYPES, Event, iso
from tagrelay.model.outcome import Dead, Delivered, Outcome, Retry

__all__ = [
    "CLICK_ID_PARAMS",
    "EVENT_TYPES",
    "Dead",
    "Delivered",
    "Event",
    "Outcome",
    "Retry",
    "iso",
]
