"""The event model (Segment spec) and the outcomes of delivering events."""

from tagrelay.model.event import EVENT_TYPES, Event, iso
from tagrelay.model.outcome import Dead, Delivered, Outcome, Retry

__all__ = ["EVENT_TYPES", "Dead", "Delivered", "Event", "Outcome", "Retry", "iso"]
