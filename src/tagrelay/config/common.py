"""Building blocks of the configuration models shared by the core and every forwarder.

Every option carries a ``description`` and an ``examples`` entry: the JSON Schema and the
README's reference are generated from them, and a test enforces that none is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    TypeAdapter,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema
from yarl import URL

ConsentCategory = Literal["analytics", "ads", "ad_user_data", "ad_personalization"]
CONSENT_CATEGORIES: tuple[str, ...] = ("analytics", "ads", "ad_user_data", "ad_personalization")

EVENT_TYPES = ("page", "track", "identify", "group", "alias", "screen")
EventType = Literal["page", "track", "identify", "group", "alias", "screen"]

ForwarderId = Annotated[
    str,
    Field(
        pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description="Unique id of this forwarder; used in metrics, logs and the spool cursor.",
        examples=["warehouse"],
    ),
]


@dataclass(frozen=True, eq=False)
class LazyUnion:
    """A discriminated union of models whose members are looked up by tag as values are
    validated, put on a field as ``Annotated[Base, LazyUnion(...)]``.

    Validation is a tagged union like pydantic's own (the same errors, with the tag in their
    locations), but each member is asked of ``model`` only when a value carries its tag: a
    union over every forwarder's config would import every forwarder's module (and what
    each imports) to validate a file that names one of them. The JSON Schema is the whole
    union, every member looked up, as a plain discriminated union would give it.
    """

    discriminator: str
    tags: Collection[str]
    """Every valid tag; iterated without looking any member up."""
    model: Callable[[str], type[BaseModel]]
    """The member of a tag (imported on first use)."""

    def members(self) -> tuple[type[BaseModel], ...]:
        """Every member, in tag order: each one looked up."""
        return tuple(self.model(tag) for tag in self.tags)

    def union(self) -> Any:
        """The same union as a plain pydantic discriminated union of every member."""
        return Annotated[Union[self.members()], Field(discriminator=self.discriminator)]  # noqa: UP007

    def _validate(self, tag: str, value: Any) -> BaseModel:
        return self.model(tag).model_validate(value)

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        choices: dict[str, CoreSchema] = {
            tag: core_schema.no_info_plain_validator_function(partial(self._validate, tag))
            for tag in self.tags
        }
        return core_schema.tagged_union_schema(choices, self.discriminator)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(TypeAdapter(self.union()).core_schema)


def unwrap_annotated(annotation: Any, discriminator: str | None = None) -> tuple[Any, str | None]:
    """Strip ``Annotated[...]`` layers from a field's annotation; also return the union
    discriminator one of them declares (or ``discriminator`` when none does). A
    ``LazyUnion`` in them is returned as the annotation, with its discriminator."""
    while get_origin(annotation) is Annotated:
        annotation, *metadata = get_args(annotation)
        for meta in metadata:
            if isinstance(meta, FieldInfo) and isinstance(meta.discriminator, str):
                discriminator = meta.discriminator
            elif isinstance(meta, LazyUnion):
                return meta, meta.discriminator
    return annotation, discriminator


class ConfigModel(BaseModel):
    """Base of every configuration model: unknown keys are errors, models are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchConfig(ConfigModel):
    """How a forwarder groups events before sending them."""

    max_events: int = Field(
        100, ge=1, le=10_000, description="Send when this many events are waiting.", examples=[100]
    )
    max_wait_secs: float = Field(
        1.0,
        ge=0,
        le=3600,
        description="Send a partial batch once its oldest event has waited this long.",
        examples=[1.0],
    )


class RetryConfig(ConfigModel):
    """Retries of a batch that failed for a transient reason (a connection error, a timeout,
    408, 429, 5xx): capped exponential backoff with full jitter, or the destination's
    Retry-After. An outage only delays events: one becomes a dead letter only once it is
    older than ``max_age_secs`` and its batch has also failed ``max_attempts`` times."""

    max_attempts: int = Field(
        10,
        ge=1,
        description=(
            "Failed attempts a batch must have used before its events older than "
            "max_age_secs become dead letters; younger events are retried whatever the "
            "count. Counted per batch and stored with the cursor (a restart keeps it)."
        ),
        examples=[10],
    )
    initial_backoff_secs: float = Field(
        1.0, gt=0, description="Backoff ceiling after the first failure.", examples=[1.0]
    )
    max_backoff_secs: float = Field(
        60.0,
        gt=0,
        le=3600,
        description=(
            "Upper bound of any single backoff: once a destination recovers, delivery "
            "resumes within this time, then the backlog goes out at full speed."
        ),
        examples=[60.0],
    )
    max_retry_after_secs: float = Field(
        3600.0,
        ge=0,
        le=86_400,
        description=(
            "Upper bound of a destination's Retry-After (seconds or an HTTP date): a "
            "longer wait is cut to this."
        ),
        examples=[3600.0],
    )
    max_age_secs: float = Field(
        86_400.0,
        gt=0,
        description=(
            "Age (since the relay received it) past which an event whose batch keeps "
            "failing becomes a dead letter, once the batch has used max_attempts. Never "
            "more than the destination accepts (ga4: 72 hours)."
        ),
        examples=[86_400.0],
    )


class FilterConfig(ConfigModel):
    """Which events a forwarder receives. Empty include lists mean 'everything'."""

    include_types: list[EventType] = Field(
        default_factory=list, description="Only these event types.", examples=[["track", "page"]]
    )
    exclude_types: list[EventType] = Field(
        default_factory=list, description="Never these event types.", examples=[["identify"]]
    )
    include_events: list[str] = Field(
        default_factory=list,
        description="Only track events with these names (other types are not affected).",
        examples=[["Order Completed"]],
    )
    exclude_events: list[str] = Field(
        default_factory=list,
        description="Never track events with these names.",
        examples=[["Internal Test"]],
    )


class ForwarderConfigBase(ConfigModel):
    """Options every forwarder has. Each forwarder module subclasses this with its own
    ``type`` literal and options."""

    id: ForwarderId
    enabled: bool = Field(
        True,
        description=(
            "A disabled forwarder receives nothing; its cursor is kept like a removed "
            "forwarder's (spool.forget_cursor_after_secs)."
        ),
        examples=[True],
    )
    start: Literal["head", "earliest"] = Field(
        "head",
        description=(
            "Where a forwarder the spool has no cursor for starts (a new one, added by a "
            "reload or before a start): head: with the events that arrive from then on; "
            "earliest: with the oldest event the spool still holds (those no forwarder has "
            "delivered yet, and the delivered ones not pruned yet)."
        ),
        examples=["earliest"],
    )
    batch: BatchConfig = Field(
        default_factory=BatchConfig, description="Batching.", examples=[{"max_events": 100}]
    )
    retry: RetryConfig = Field(
        default_factory=RetryConfig,
        description="Retries and dead letters.",
        examples=[{"max_attempts": 10, "max_age_secs": 86_400}],
    )
    filter: FilterConfig = Field(
        default_factory=FilterConfig,
        description="Which events this forwarder receives.",
        examples=[{"include_types": ["track"]}],
    )
    requires_consent: list[ConsentCategory] = Field(
        default_factory=list,
        description=(
            "Consent categories an event must grant (context.consent) to be sent here; "
            "other events are dropped and counted with reason consent_denied."
        ),
        examples=[["ads", "ad_user_data"]],
    )


def is_bare_origin(url: URL) -> bool:
    """Whether ``url`` is an origin and nothing more: http or https, a host, an optional
    port; no path, query, fragment or credentials (an ``upstream`` setting)."""
    return (
        url.scheme in ("http", "https")
        and bool(url.host)
        and url.user is None
        and url.password is None
        and url.path in ("", "/")
        and not url.query_string
        and not url.fragment
    )
