"""The loader: YAML with lines, ${VAR} interpolation, and every problem reported at once
with its key path and line, without ever showing a secret."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tagrelay.config.loader import format_config_error, load_config, parse_config
from tagrelay.config.models import Config, ServerConfig
from tagrelay.errors import ConfigError
from tagrelay.forwarders import FORWARDERS

TYPES = ", ".join(sorted(FORWARDERS))
"""The forwarder types the messages list (every registered one, in order)."""

SERVER_KEYS = ", ".join(ServerConfig.model_fields)
"""Every key of ``server:``, in the order an unknown-key error lists them."""

KEYS = """\
keys:
  - id: website
    kind: browser
    key: wk_browser
"""


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "test.yaml", env={} if env is None else env)


def problems_of(text: str, env: dict[str, str] | None = None) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as caught:
        parse(text, env)
    assert caught.value.source == "test.yaml"
    return [(p.path, p.line, p.message) for p in caught.value.problems]


def where(text: str, env: dict[str, str] | None = None) -> list[tuple[str, int | None]]:
    return [(path, line) for path, line, _ in problems_of(text, env)]


def test_a_minimal_file_loads_with_defaults() -> None:
    config = parse(KEYS)
    assert config.keys[0].id == "website"
    assert config.keys[0].key.get_secret_value() == "wk_browser"
    assert config.server.port == 8080
    assert config.forwarders == []


# --- interpolation --------------------------------------------------------------------------


def test_placeholder_takes_the_environment_value() -> None:
    config = parse(KEYS.replace("wk_browser", "${BROWSER_KEY}"), {"BROWSER_KEY": "from-env"})
    assert config.keys[0].key.get_secret_value() == "from-env"


def test_default_applies_when_unset_or_empty_and_not_when_set() -> None:
    text = KEYS.replace("wk_browser", "${BROWSER_KEY:-fallback}")
    assert parse(text, {}).keys[0].key.get_secret_value() == "fallback"
    assert parse(text, {"BROWSER_KEY": ""}).keys[0].key.get_secret_value() == "fallback"
    assert parse(text, {"BROWSER_KEY": "set"}).keys[0].key.get_secret_value() == "set"


def test_placeholders_inside_longer_text() -> None:
    text = KEYS + "data_dir: ${BASE:-/srv}/tagrelay/${ENV}\n"
    assert parse(text, {"ENV": "prod"}).data_dir == Path("/srv/tagrelay/prod")


def test_unset_variable_without_default_is_an_error_at_its_line() -> None:
    text = """\
        data_dir: data
        keys:
          - id: website
            kind: browser
            key: ${BROWSER_KEY}
        """
    assert problems_of(text) == [
        (
            "keys[0].key",
            5,
            "environment variable BROWSER_KEY is not set; set it, or give a default "
            "with ${BROWSER_KEY:-default}",
        )
    ]


def test_an_unset_variable_is_reported_once_not_again_as_a_type_error() -> None:
    text = KEYS + "server:\n  port: ${PORT}\n"
    assert where(text) == [("server.port", 6)]


def test_dollar_dollar_is_a_literal_dollar() -> None:
    config = parse(KEYS.replace("wk_browser", "'pa$$word-$${NOT_A_VAR}'"))
    assert config.keys[0].key.get_secret_value() == "pa$word-${NOT_A_VAR}"


def test_a_lone_dollar_is_kept() -> None:
    assert parse(KEYS.replace("wk_browser", "a$b$")).keys[0].key.get_secret_value() == "a$b$"


def test_variables_come_from_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGRELAY_TEST_KEY", "from-os-environ")
    text = KEYS.replace("wk_browser", "${TAGRELAY_TEST_KEY}")
    config = parse_config(text, "test.yaml")
    assert config.keys[0].key.get_secret_value() == "from-os-environ"


def test_substituted_values_take_the_type_of_their_option() -> None:
    text = KEYS + textwrap.dedent(
        """\
        server:
          port: ${PORT:-8080}
        forwarders:
          - id: warehouse
            type: warehouse
            enabled: ${WAREHOUSE_ON:-true}
            batch:
              max_wait_secs: ${WAIT}
        """
    )
    config = parse(text, {"WAREHOUSE_ON": "false", "WAIT": "2.5"})
    assert config.server.port == 8080
    assert config.forwarders[0].enabled is False
    assert config.forwarders[0].batch.max_wait_secs == 2.5
    assert parse(text, {"PORT": "9090", "WAIT": "1"}).server.port == 9090


def test_a_substituted_secret_that_looks_like_a_number_stays_a_string() -> None:
    config = parse(KEYS.replace("wk_browser", "${BROWSER_KEY}"), {"BROWSER_KEY": "0123456"})
    assert config.keys[0].key.get_secret_value() == "0123456"


def test_a_substituted_value_of_the_wrong_type_is_reported_at_its_line() -> None:
    text = KEYS + "server:\n  port: ${PORT}\n"
    assert problems_of(text, {"PORT": "http"}) == [
        ("server.port", 6, "expected an integer, got 'http'")
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "x${UNCLOSED",
            "unterminated placeholder: '${' needs a closing '}' ('$$' is a literal '$')",
        ),
        (
            "${9LIVES}",
            "invalid placeholder: expected ${NAME} or ${NAME:-default}, NAME made of letters, "
            "digits and '_' ('$$' is a literal '$')",
        ),
        ("${A:-${B}}", "the default of ${A:-...} contains a placeholder; nesting is not supported"),
    ],
)
def test_malformed_placeholders(value: str, message: str) -> None:
    assert problems_of(KEYS.replace("wk_browser", f"'{value}'")) == [("keys[0].key", 4, message)]


# --- every problem at once, with paths and lines ------------------------------------------


def test_several_problems_are_all_reported_with_their_paths_and_lines() -> None:
    text = """\
        data_dir: data
        server:
          prot: 8080
        keys:
          - id: website
            kind: browser
            allowed_origins: https://www.example.com
            key: wk_browser
        forwarders:
          - id: warehouse
            type: warehouse
          - type: google_analytics
            id: ga
          - id: hook
            type: webhook
            endpoint: hooks.example.com
            batch:
              max_events: 0
        """
    assert problems_of(text) == [
        (
            "server.prot",
            3,
            f"unknown key 'prot'; valid keys here: {SERVER_KEYS} (did you mean 'port'?)",
        ),
        ("keys[0].allowed_origins", 7, "expected a list, got 'https://www.example.com'"),
        (
            "forwarders[1].type",
            12,
            f"unknown type 'google_analytics'; expected one of: {TYPES}",
        ),
        (
            "forwarders[2].endpoint",
            16,
            "expected a string matching the pattern ^https?://, got 'hooks.example.com'",
        ),
        (
            "forwarders[2].batch.max_events",
            18,
            "expected a value greater than or equal to 1, got 0",
        ),
    ]


def test_missing_options_point_at_the_mapping_that_lacks_them() -> None:
    text = """\
        keys:
          - id: website
            kind: browser
        forwarders:
          - type: webhook
            id: hook
          - id: untyped
        """
    assert problems_of(text) == [
        ("keys[0].key", 2, "required option is missing"),
        ("forwarders[0].endpoint", 5, "required option is missing"),
        (
            "forwarders[1].type",
            7,
            f"required option is missing; set it to one of: {TYPES}",
        ),
    ]


def test_missing_keys_list_is_reported_at_the_top() -> None:
    assert problems_of("# the relay\ndata_dir: data\n") == [
        ("keys", 2, "required option is missing")
    ]


def test_unknown_keys_of_a_forwarder_list_that_forwarders_options() -> None:
    text = KEYS + "forwarders:\n  - id: warehouse\n    type: warehouse\n    tabel: events\n"
    assert problems_of(text) == [
        (
            "forwarders[0].tabel",
            8,
            "unknown key 'tabel'; valid keys here: id, enabled, start, batch, retry, "
            "filter, requires_consent, type, dialect, path, dsn, schema, table, max_columns, "
            "memory_limit_mb, hash_pii, hash_pii_salt, retention_days (did you mean 'table'?)",
        )
    ]


def test_wrong_type_for_a_whole_section() -> None:
    text = KEYS + "forwarders:\n  - just a name\nlimits: [1, 2]\n"
    assert problems_of(text) == [
        ("forwarders[0]", 6, "expected a mapping, got 'just a name'"),
        ("limits", 7, "expected a mapping, got a list"),
    ]


def test_literal_choices_are_listed() -> None:
    assert problems_of(KEYS.replace("kind: browser", "kind: mobile")) == [
        ("keys[0].kind", 3, "expected 'browser' or 'server', got 'mobile'")
    ]


def test_an_invalid_network_is_one_problem_not_one_per_ip_version() -> None:
    text = KEYS + "server:\n  trusted_proxies:\n    - 10.0.0.0/8\n    - not-a-network\n"
    assert problems_of(text) == [
        (
            "server.trusted_proxies[1]",
            8,
            "expected an IPv4 network in CIDR notation (e.g. 10.0.0.0/8) or an IPv6 network "
            "in CIDR notation (e.g. fd00::/8), got 'not-a-network'",
        )
    ]


def test_model_level_rules_are_reported_at_the_item() -> None:
    text = (
        KEYS + "  - id: backend\n    kind: server\n    key: wk_server\n    allowed_origins: ['*']\n"
    )
    assert problems_of(text) == [
        (
            "keys[1]",
            5,
            "allowed_origins applies to browser keys only; server keys are not for pages",
        )
    ]


def test_hosts_are_host_names_of_browser_keys_only() -> None:
    config = parse(KEYS + "    hosts: [Data.Shop.Test.]\n")
    assert config.keys[0].hosts == ["data.shop.test"]
    bad = KEYS + "    hosts: ['https://data.shop.test', 'data.shop.test:443', '127.0.0.1', 'a b']\n"
    assert problems_of(bad) == [
        (
            "keys[0].hosts",
            5,
            "not host names: 'https://data.shop.test', 'data.shop.test:443', '127.0.0.1', "
            "'a b' (expected letters, digits, hyphens and dots, like data.example.com; no "
            "scheme, port, path or IP address)",
        )
    ]
    server = (
        KEYS + "  - id: backend\n    kind: server\n    key: wk_server\n    hosts: [a.shop.test]\n"
    )
    assert problems_of(server) == [
        (
            "keys[1]",
            5,
            "hosts applies to browser keys only: a keyless request must never be taken as sent "
            "with a server key (a secret)",
        )
    ]


def test_a_host_belongs_to_one_key() -> None:
    text = KEYS + (
        "    hosts: [data.shop.test]\n"
        "  - id: other\n    kind: browser\n    key: wk_2\n    hosts: [DATA.shop.test]\n"
    )
    assert problems_of(text) == [
        (
            "keys",
            1,
            "host 'data.shop.test' is claimed by keys 'website' and 'other'; a host maps to "
            "one key",
        )
    ]


# --- duplicates -------------------------------------------------------------------------


def test_duplicate_ids_and_key_values_are_reported_once_at_the_second_occurrence() -> None:
    text = """\
        keys:
          - id: website
            kind: browser
            key: same-value
          - id: website
            kind: server
            key: same-value
        forwarders:
          - id: warehouse
            type: warehouse
          - id: warehouse
            type: warehouse
        """
    assert problems_of(text) == [
        (
            "keys[1].id",
            5,
            "id 'website' is already used by keys[0].id (line 2); ids must be unique",
        ),
        (
            "keys[1].key",
            7,
            "same key value as keys[0].key (line 4); every write key needs its own value",
        ),
        (
            "forwarders[1].id",
            11,
            "id 'warehouse' is already used by forwarders[0].id (line 9); ids must be unique",
        ),
    ]


def test_duplicate_ids_are_found_even_when_another_item_is_invalid() -> None:
    # Config's own check runs only once every item is valid; the loader's runs anyway.
    text = KEYS + "  - id: website\n    kind: server\n    key: wk_server\n    colour: red\n"
    assert where(text) == [("keys[1].id", 5), ("keys[1].colour", 8)]


def test_a_key_given_twice_in_one_mapping_is_an_error() -> None:
    text = KEYS + "server:\n  port: 8080\n  host: 127.0.0.1\n  port: 9090\n"
    assert problems_of(text) == [("server.port", 8, "key 'port' is given twice (first at line 6)")]


def test_merge_keys_may_override_without_being_duplicates() -> None:
    text = KEYS + textwrap.dedent(
        """\
        forwarders:
          - id: first
            type: warehouse
            batch: &fast {max_events: 10, max_wait_secs: 0.5}
          - id: second
            type: warehouse
            table: second_events
            batch:
              <<: *fast
              max_wait_secs: 2
        """
    )
    first, second = parse(text).forwarders
    assert (first.batch.max_events, first.batch.max_wait_secs) == (10, 0.5)
    assert (second.batch.max_events, second.batch.max_wait_secs) == (10, 2.0)


# --- secrets ------------------------------------------------------------------------------


def test_error_messages_never_show_secret_values() -> None:
    text = """\
        keys:
          - id: website
            kind: browser
            key: 31415926535
          - id: backend
            kind: server
            key: [s3cr3t-in-a-list]
            kye: s3cr3t-under-a-typo
          - id: other
            kind: server
            key: ${SERVER_KEY}
          - id: again
            kind: server
            key: ${SERVER_KEY}
        forwarders:
          - id: hook
            type: webhook
            endpoint: https://hooks.example.com
            headers:
              Authorization: [Bearer s3cr3t-header]
              X-Token: 27182818284
          - id: hook2
            type: webhook
            endpoint: https://hooks.example.com
            headers: Bearer s3cr3t-headers-as-text
        """
    with pytest.raises(ConfigError) as caught:
        parse(text, {"SERVER_KEY": "s3cr3t-from-env"})
    assert [(p.path, p.line) for p in caught.value.problems] == [
        ("keys[0].key", 4),
        ("keys[1].key", 7),
        ("keys[1].kye", 8),
        ("keys[3].key", 14),
        ("forwarders[0].headers.Authorization", 20),
        ("forwarders[0].headers.X-Token", 21),
        ("forwarders[1].headers", 25),
    ]
    rendered = format_config_error(caught.value) + str(caught.value)
    for secret in ("31415926535", "s3cr3t", "27182818284", "Bearer"):
        assert secret not in rendered
    assert (
        "keys[0].key: expected a string, got an integer (YAML reads it as one; put it in quotes)"
        in rendered
    )


# --- YAML and file problems -------------------------------------------------------------


def test_yaml_syntax_error_is_reported_with_its_line() -> None:
    text = "keys:\n  - id: website\n    kind: browser\n   key: wk\n"
    assert problems_of(text) == [
        (
            "",
            4,
            "invalid YAML: expected <block end>, but found '<block mapping start>' "
            "(while parsing a block collection started at line 2)",
        )
    ]


def test_unclosed_flow_list_names_where_it_started() -> None:
    (problem,) = problems_of(KEYS + "forwarders: [\n  {id: a, type: warehouse}\n")
    assert problem[1] == 7
    assert problem[2].endswith("(while parsing a flow sequence started at line 5)")


def test_tab_indentation_is_a_syntax_error_with_its_line() -> None:
    assert where(KEYS + "server:\n\tport: 1\n") == [("", 6)]


def test_several_documents_are_rejected() -> None:
    assert problems_of(KEYS + "---\ndata_dir: other\n") == [
        ("", 5, "invalid YAML: a second document starts here; the configuration is one")
    ]


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_an_empty_file_is_an_error(text: str) -> None:
    assert problems_of(text) == [
        ("", None, "the file is empty; it needs at least a 'keys:' list of write keys")
    ]


@pytest.mark.parametrize(
    ("text", "got"), [("- a\n- b\n", "a list"), ("just text\n", "a string"), ("~\n", "nothing")]
)
def test_the_top_level_must_be_a_mapping(text: str, got: str) -> None:
    ((path, line, message),) = problems_of(text)
    assert (path, line) == ("", 1)
    assert message.startswith("expected a mapping of options at the top level")
    assert f"got {got}" in message


def test_keys_that_yaml_reads_as_non_strings_are_reported() -> None:
    text = KEYS + "forwarders:\n  - id: hook\n    type: webhook\n    endpoint: https://x.test\n"
    text += "    headers:\n      on: yes\n      404: x\n"
    assert problems_of(text) == [
        ("forwarders[0].headers", 10, "keys must be strings, got a boolean; quote it: 'on'"),
        ("forwarders[0].headers", 11, "keys must be strings, got an integer; quote it: '404'"),
    ]


def test_python_tags_are_refused_not_constructed() -> None:
    text = KEYS + "limits: !!python/object/apply:os.system ['echo pwned']\n"
    assert problems_of(text) == [
        (
            "limits",
            5,
            "unsupported YAML tag 'tag:yaml.org,2002:python/object/apply:os.system'; "
            "use plain mappings and lists",
        )
    ]


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(KEYS, encoding="utf-8")
    assert load_config(path).keys[0].id == "website"
    assert load_config(str(path)).keys[0].id == "website"


def test_a_relative_data_dir_stays_relative_to_the_working_directory(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "relay.yaml"
    path.parent.mkdir()
    path.write_text(KEYS + "data_dir: var/data\n", encoding="utf-8")
    assert load_config(path).data_dir == Path("var/data")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "file not found; pass the path of a YAML file"),
        (lambda p: p.mkdir(), "is a directory; pass the path of a YAML file"),
    ],
)
def test_unreadable_files_are_config_errors(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "relay.yaml"
    make(path)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert format_config_error(caught.value) == f"{path}: {message}"


def test_invalid_utf8_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_bytes(KEYS.encode() + b"data_dir: \xff\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert format_config_error(caught.value) == f"{path}:5: the file is not valid UTF-8 text"


def test_format_config_error_prints_one_problem_per_line() -> None:
    text = KEYS + "server:\n  port: eighty\n  hots: x\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "config/tagrelay.yaml", env={})
    assert format_config_error(caught.value) == (
        "config/tagrelay.yaml:6: server.port: expected an integer, got 'eighty'\n"
        "config/tagrelay.yaml:7: server.hots: unknown key 'hots'; valid keys here: "
        f"{SERVER_KEYS} (did you mean 'host'?)"
    )


def test_the_spool_is_sqlite_unless_jetstream_is_chosen() -> None:
    assert parse(KEYS).spool.type == "sqlite"
    config = parse(
        KEYS
        + """
spool:
  type: jetstream
  servers: ["nats://nats:4222"]
  stream: relay-eu
  replicas: 3
"""
    )
    assert (config.spool.type, config.spool.servers, config.spool.stream) == (
        "jetstream",
        ["nats://nats:4222"],
        "relay-eu",
    )
    assert config.spool.replicas == 3 and config.spool.ack_wait_secs == 30


def test_jetstream_keys_without_type_jetstream_are_an_error() -> None:
    ((path, line, message),) = problems_of(KEYS + "spool:\n  stream: relay\n  replicas: 3\n")
    assert path == "spool" and line == 5  # where spool: starts
    assert "stream, replicas apply to type: jetstream only" in message


def test_a_stream_name_nats_would_refuse_is_an_error() -> None:
    ((path, _, _),) = problems_of(KEYS + "spool:\n  type: jetstream\n  stream: a.b\n")
    assert path == "spool.stream"
