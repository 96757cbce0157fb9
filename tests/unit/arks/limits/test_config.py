"""The rate-limit configuration: envoyproxy/ratelimit's YAML, its errors and its lookups."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from arks.limits.config import ConfigError, RateLimitConfig, load_config, parse_config
from arks.limits.model import Algorithm, RateLimit, Unit

FIXTURES = Path(__file__).parent / "fixtures"
ERRORS = FIXTURES / "errors"
VALID = FIXTURES / "valid"
ENVOYPROXY = FIXTURES / "envoyproxy"


def load(*names: str, under: Path = VALID) -> RateLimitConfig:
    return load_config([under / name for name in names])


def limit_of(config: RateLimitConfig, domain: str, *entries: tuple[str, str]) -> RateLimit:
    found = config.lookup(domain, entries)
    assert found is not None, f"no limit for {entries} in {domain}"
    return found


def rpu(config: RateLimitConfig, domain: str, *entries: tuple[str, str]) -> int:
    return limit_of(config, domain, *entries).requests_per_unit


# --- errors: one fixture each, the message names the file and the exact path ------------------

ERROR_CASES = [
    # (fixture, path, words of the problem)
    ("not_a_mapping", ".", "expected a domain file (a mapping), got list"),
    ("empty_file", ".", "got an empty document"),
    ("invalid_yaml", "line 4, column 11", "invalid YAML"),
    ("repeated_yaml_key", "line 7, column 7", "duplicate key 'requests_per_unit'"),
    ("missing_domain", "domain", "required"),
    ("empty_domain", "domain", "must not be empty"),
    ("domain_not_string", "domain", "expected a string, got int 42"),
    ("unknown_top_level_field", "descriptor", "unknown field"),
    ("descriptors_not_list", "descriptors", "expected a list, got a mapping"),
    (
        "descriptor_not_mapping",
        "descriptors[0]",
        "expected a descriptor (a mapping), got str 'user'",
    ),
    ("missing_key", "descriptors[0].key", "required"),
    ("empty_key", "descriptors[0].key", "must not be empty"),
    ("value_not_string", "descriptors[0].value", "expected a string, got int 2061234567 (quote it"),
    (
        "share_threshold_without_wildcard",
        "descriptors[0].share_threshold",
        "only a wildcard value (holding '*') can share its counter",
    ),
    ("misspelt_descriptor_field", "descriptors[0].rate_limits", "unknown field"),
    (
        "misspelt_rate_limit_field",
        "descriptors[0].descriptors[1].rate_limit.request_per_unit",
        "unknown field",
    ),
    (
        "misplaced_shadow_mode",
        "descriptors[0].rate_limit.shadow_mode",
        "it belongs in a descriptor",
    ),
    ("misplaced_name", "descriptors[0].name", "it belongs in a rate_limit"),
    (
        "rate_limit_not_mapping",
        "descriptors[0].rate_limit",
        "expected rate_limit (a mapping), got str",
    ),
    (
        "bad_unit",
        "descriptors[0].descriptors[1].rate_limit.unit",
        "unknown unit 'fortnight'; expected one of second",
    ),
    ("missing_unit", "descriptors[0].rate_limit.unit", "required"),
    ("missing_requests_per_unit", "descriptors[0].rate_limit.requests_per_unit", "required"),
    (
        "negative_requests_per_unit",
        "descriptors[0].rate_limit.requests_per_unit",
        "-1 is out of range",
    ),
    (
        "too_many_requests_per_unit",
        "descriptors[0].rate_limit.requests_per_unit",
        "4294967296 is out of range",
    ),
    (
        "bool_requests_per_unit",
        "descriptors[0].rate_limit.requests_per_unit",
        "expected an integer, got bool True",
    ),
    (
        "string_requests_per_unit",
        "descriptors[0].rate_limit.requests_per_unit",
        "expected an integer, got str '500'",
    ),
    (
        "unlimited_with_unit",
        "descriptors[0].rate_limit.unit",
        "must not be set when unlimited is true",
    ),
    (
        "unlimited_not_bool",
        "descriptors[0].rate_limit.unlimited",
        "expected true or false, got str 'true'",
    ),
    ("shadow_mode_not_bool", "descriptors[0].shadow_mode", "expected true or false"),
    ("bad_algorithm", "descriptors[0].rate_limit.algorithm", "unknown algorithm 'sliding_log'"),
    (
        "duplicate_key_value",
        "descriptors[1]",
        "duplicate of descriptors[0] (key 'database', value 'users')",
    ),
    (
        "duplicate_key_only",
        "descriptors[0].descriptors[1]",
        "duplicate of descriptors[0].descriptors[0]",
    ),
    (
        "duplicate_prefix",
        "descriptors[1]",
        "duplicate of descriptors[0] (key 'path', value '/v1/*')",
    ),
    (
        "duplicate_name",
        "descriptors[1].descriptors[0].rate_limit.name",
        "already used at descriptors[0].rate_limit.name",
    ),
    (
        "replaces_unknown_name",
        "descriptors[1].rate_limit.replaces[1].name",
        "no limit named 'per_usr' in domain 'replaces'",
    ),
    ("replaces_self", "descriptors[0].rate_limit.replaces[0].name", "cannot replace itself"),
    ("replaces_empty_name", "descriptors[0].rate_limit.replaces[0].name", "must not be empty"),
    ("replaces_unknown_field", "descriptors[1].rate_limit.replaces[0].limit", "unknown field"),
    ("replaces_not_list", "descriptors[1].rate_limit.replaces", "expected a list, got str"),
]


@pytest.mark.parametrize(
    ("fixture", "path", "problem"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES]
)
def test_each_config_error_names_the_file_the_path_and_the_problem(
    fixture: str, path: str, problem: str
) -> None:
    file = ERRORS / f"{fixture}.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config([file])
    err = caught.value
    assert str(err).startswith(f"{file}: {path}: "), str(err)
    assert (err.file, err.path) == (str(file), path)
    assert problem in err.problem


def test_every_error_fixture_is_exercised() -> None:
    assert sorted(p.stem for p in ERRORS.glob("*.yaml")) == sorted(c[0] for c in ERROR_CASES)


def test_a_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_the_same_domain_in_two_files_is_an_error_naming_the_second() -> None:
    first, second = (
        FIXTURES / "duplicate_domain" / "a.yaml",
        FIXTURES / "duplicate_domain" / "b.yaml",
    )
    with pytest.raises(ConfigError) as caught:
        load_config([FIXTURES / "duplicate_domain"])
    assert str(caught.value).startswith(
        f"{second}: domain: duplicate domain 'shared', already in {first} (merging"
    )
    assert "MERGE_DOMAIN_CONFIG" in str(caught.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.yaml: \.: cannot read"):
        load_config([tmp_path / "absent.yaml"])


def test_parse_config_names_the_source_it_was_given() -> None:
    with pytest.raises(ConfigError, match=r"^inline: descriptors\[0\]\.key: required$"):
        parse_config([("inline", {"domain": "d", "descriptors": [{"value": "v"}]})])


# --- loading -------------------------------------------------------------------------------


def test_no_paths_give_an_empty_config() -> None:
    config = load_config([])
    assert config == RateLimitConfig()
    assert config.domains == {}
    assert config.lookup("any", [("k", "v")]) is None


def test_a_directory_loads_every_yaml_and_yml_file_in_it() -> None:
    config = load_config([ENVOYPROXY])
    assert sorted(config.domains) == [
        "edge_proxy_per_ip",
        "example4",
        "example6",
        "example7",
        "example8",
        "example9",
        "internal",
        "messaging",
        "mongo_cps",
        "rl",
    ]


def test_a_directory_load_skips_other_files_dotfiles_and_subdirectories(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("domain: a\n")
    (tmp_path / "b.yml").write_text("domain: b\n")
    (tmp_path / "notes.txt").write_text("not: yaml: at all:\n")
    (tmp_path / ".a.yaml.swp").write_text("junk")
    (tmp_path / ".hidden.yaml").write_text("domain: a\n")  # would be a duplicate domain
    (tmp_path / "..data").mkdir()  # how a mounted ConfigMap looks
    (tmp_path / "..data" / "c.yaml").write_text("domain: a\n")
    assert sorted(load_config([tmp_path]).domains) == ["a", "b"]


def test_files_and_directories_mix() -> None:
    config = load_config([VALID / "units.yaml", ENVOYPROXY])
    assert {"units", "mongo_cps"} <= set(config.domains)


def test_a_domain_may_have_no_descriptors() -> None:
    config = parse_config([("inline", {"domain": "empty"})])
    assert "empty" in config.domains
    assert config.lookup("empty", [("k", "v")]) is None


def test_the_config_is_immutable() -> None:
    config = load("units.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.domains = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.domains["other"] = config.domains["units"]  # type: ignore[index]


# --- the fields of a limit -----------------------------------------------------------------


@pytest.mark.parametrize("unit", list(Unit))
def test_every_unit_parses_in_any_case(unit: Unit) -> None:
    limit = limit_of(load("units.yaml"), "units", ("unit", unit.name.lower()))
    assert limit.unit is unit


def test_a_limit_carries_every_configured_field() -> None:
    config = load("features.yaml")
    assert limit_of(config, "llm", ("tenant", "acme"), ("user", "bob")) == RateLimit(
        requests_per_unit=60,
        unit=Unit.MINUTE,
        name="per_user",
        algorithm=Algorithm.GCRA,
        stats_key="llm.tenant.user",
    )
    assert limit_of(
        config, "llm", ("tenant", "acme"), ("user", "bob"), ("model", "gpt-4o")
    ) == RateLimit(
        requests_per_unit=100,
        unit=Unit.HOUR,
        name="per_user_gpt4",
        algorithm=Algorithm.FIXED_WINDOW,
        detailed_metric=True,
        stats_key="llm.tenant.user.model_gpt-4*",
    )
    assert limit_of(config, "llm", ("tenant", "acme"), ("user", "vip-carol")) == RateLimit(
        requests_per_unit=600,
        unit=Unit.MINUTE,
        name="vip",
        replaces=("per_user",),
        shadow_mode=True,
        stats_key="llm.tenant.user_vip-*",
    )


def test_unlimited_needs_no_requests_per_unit_and_keeps_one_if_given() -> None:
    config = load("features.yaml")
    internal = limit_of(config, "llm", ("tenant", "internal"))
    assert internal.unlimited
    assert internal.requests_per_unit == 0
    assert internal.stats_key == "llm.tenant_internal"
    free_user = limit_of(config, "llm", ("tenant", "free"), ("user", "u"))
    assert free_user.unlimited
    assert free_user.requests_per_unit == 5


def test_zero_requests_per_unit_is_a_limit_not_an_absence() -> None:
    limit = limit_of(load("features.yaml"), "llm", ("tenant", "free"))
    assert (limit.requests_per_unit, limit.unit, limit.unlimited) == (0, Unit.DAY, False)


def test_an_empty_value_means_no_value() -> None:
    descriptor = {"key": "k", "value": "", "rate_limit": {"unit": "second", "requests_per_unit": 1}}
    config = parse_config([("inline", {"domain": "d", "descriptors": [descriptor]})])
    assert limit_of(config, "d", ("k", "anything")).stats_key == "d.k"


def test_yaml_anchors_and_merge_keys_work_with_the_strict_loader() -> None:
    config = load("anchors.yaml")
    assert limit_of(config, "anchors", ("team", "t")).requests_per_unit == 10
    org = limit_of(config, "anchors", ("org", "o"))
    assert (org.requests_per_unit, org.unit) == (100, Unit.MINUTE)


# --- lookup --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("llama-3-8b", 5),  # exact beats every wildcard
        ("llama-3-70b", 4),  # the first matching wildcard in the file's order ...
        ("llama-2", 3),  # ... (the file lists the specific ones first)
        ("mistral", 2),  # "*" matches any value
        ("", 2),
    ],
)
def test_exact_beats_a_wildcard_which_beats_key_only(value: str, expected: int) -> None:
    assert rpu(load("precedence.yaml"), "precedence", ("model", value)) == expected


def test_the_first_matching_wildcard_in_the_file_wins_not_the_longest() -> None:
    """envoyproxy/ratelimit tries a level's wildcards in the order it loaded them."""
    assert rpu(load("precedence.yaml"), "precedence", ("route", "/v1/chat/completions")) == 10


def test_key_only_catches_what_no_prefix_matches() -> None:
    config = load("precedence.yaml")
    assert rpu(config, "precedence", ("path", "/v1/chat")) == 6
    assert rpu(config, "precedence", ("path", "/v2/chat")) == 7
    assert rpu(config, "precedence", ("path", "/v1")) == 7


def test_a_prefix_wildcard_matches_the_prefix_itself() -> None:
    assert rpu(load("precedence.yaml"), "precedence", ("path", "/v1/")) == 6


def test_lookup_never_backtracks_to_a_less_specific_sibling() -> None:
    config = load("precedence.yaml")
    assert rpu(config, "precedence", ("tenant", "other"), ("user", "u")) == 9
    # ("tenant", "acme") matched exactly and has no children: the key-only tenant's user limit is not used
    assert config.lookup("precedence", [("tenant", "acme"), ("user", "u")]) is None


def test_entries_that_stop_before_a_limit_find_none() -> None:
    config = load("features.yaml")
    assert config.lookup("llm", [("tenant", "acme")]) is None


def test_more_entries_than_the_tree_is_deep_find_none() -> None:
    config = load("units.yaml")
    assert config.lookup("units", [("unit", "second"), ("extra", "x")]) is None


def test_an_entry_matching_no_child_finds_none() -> None:
    config = load("features.yaml")
    assert config.lookup("llm", [("tenant", "acme"), ("group", "g")]) is None
    assert config.lookup("llm", [("user", "bob")]) is None


def test_unknown_domains_and_empty_descriptors_find_none() -> None:
    config = load("units.yaml")
    assert config.lookup("nope", [("unit", "second")]) is None
    assert config.lookup("units", []) is None


def test_keys_and_values_are_case_sensitive() -> None:
    config = load("units.yaml")
    assert config.lookup("units", [("unit", "SECOND")]) is None
    assert config.lookup("units", [("Unit", "second")]) is None


# --- envoyproxy/ratelimit's own examples ---------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> RateLimitConfig:
    return load_config([ENVOYPROXY])


def test_mongo_cps(upstream: RateLimitConfig) -> None:
    users = limit_of(upstream, "mongo_cps", ("database", "users"))
    assert (users.requests_per_unit, users.unit, users.stats_key) == (
        500,
        Unit.SECOND,
        "mongo_cps.database_users",
    )
    assert upstream.lookup("mongo_cps", [("database", "other")]) is None


def test_messaging(upstream: RateLimitConfig) -> None:
    assert (
        rpu(upstream, "messaging", ("message_type", "marketing"), ("to_number", "2061111111")) == 5
    )
    assert rpu(upstream, "messaging", ("to_number", "2061111111")) == 100
    assert upstream.lookup("messaging", [("message_type", "marketing")]) is None
    assert (
        upstream.lookup(
            "messaging", [("message_type", "transactional"), ("to_number", "2061111111")]
        )
        is None
    )
    marketing = limit_of(upstream, "messaging", ("message_type", "marketing"), ("to_number", "1"))
    assert marketing.stats_key == "messaging.message_type_marketing.to_number"


def test_edge_proxy_blacklists_one_address(upstream: RateLimitConfig) -> None:
    assert rpu(upstream, "edge_proxy_per_ip", ("remote_address", "50.0.0.1")) == 10
    assert rpu(upstream, "edge_proxy_per_ip", ("remote_address", "50.0.0.5")) == 0


def test_example4_matches_only_at_the_same_depth(upstream: RateLimitConfig) -> None:
    assert rpu(upstream, "example4", ("key", "value"), ("subkey", "subvalue")) == 300
    assert upstream.lookup("example4", [("key", "value")]) is None


def test_internal_unlimited(upstream: RateLimitConfig) -> None:
    assert limit_of(upstream, "internal", ("ldap", "x")).unlimited
    assert rpu(upstream, "internal", ("azure", "x")) == 100


def test_example6_shadow_mode(upstream: RateLimitConfig) -> None:
    assert limit_of(
        upstream, "example6", ("service", "auth-service"), ("user", "user-a")
    ).shadow_mode
    assert not limit_of(
        upstream, "example6", ("service", "auth-service"), ("user", "user-b")
    ).shadow_mode
    assert upstream.lookup("example6", [("service", "auth-service"), ("user", "user-c")]) is None


def test_example7_replaces(upstream: RateLimitConfig) -> None:
    specific = limit_of(upstream, "example7", ("key_1", "value_1"), ("user", "bkthomps"))
    replacing = limit_of(upstream, "example7", ("key_2", "value_2"), ("user", "bkthomps"))
    assert (specific.name, specific.requests_per_unit) == ("specific_limit", 5)
    assert (replacing.replaces, replacing.requests_per_unit) == (("specific_limit",), 10)


def test_example8_detailed_metric(upstream: RateLimitConfig) -> None:
    assert limit_of(upstream, "example8", ("key1", "unspecified_value")).detailed_metric
    assert not limit_of(upstream, "example8", ("key1", "value1")).detailed_metric


def test_example9_prefix_wildcard(upstream: RateLimitConfig) -> None:
    limit = limit_of(upstream, "example9", ("key1", "valueXYZ"))
    assert (limit.requests_per_unit, limit.stats_key) == (20, "example9.key1_value*")
    assert upstream.lookup("example9", [("key1", "other")]) is None


def test_rl_example(upstream: RateLimitConfig) -> None:
    assert limit_of(upstream, "rl", ("category", "account")).replaces == ("bkthomps", "fake_name")
    assert rpu(upstream, "rl", ("source_cluster", "proxy"), ("destination_cluster", "mock")) == 1
    assert rpu(upstream, "rl", ("foo", "x")) == 2
    assert rpu(upstream, "rl", ("foo", "x"), ("bar", "y")) == 3
    assert limit_of(upstream, "rl", ("foo", "x"), ("bar", "bkthomps")).name == "bkthomps"
    assert limit_of(upstream, "rl", ("foo", "x"), ("baz", "shady")).shadow_mode
    assert limit_of(upstream, "rl", ("foo", "x"), ("bay", "y")).unlimited
    assert limit_of(upstream, "rl", ("unspec", "z")).detailed_metric
    assert limit_of(upstream, "rl", ("foo", "x"), ("baz", "y")).stats_key == "rl.foo.baz"
    assert upstream.lookup("rl", [("source_cluster", "proxy")]) is None
    assert upstream.lookup("rl", [("foo", "x"), ("bar", "y"), ("deeper", "z")]) is None


def test_parse_config_is_the_pure_core_of_load_config() -> None:
    import yaml

    file = ENVOYPROXY / "messaging.yaml"
    document: Any = yaml.safe_load(file.read_text())
    assert parse_config([(str(file), document)]) == load_config([file])


def problem_of(document: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config([("inline", document)])
    return caught.value.path, caught.value.problem


def in_rate_limit(**fields: Any) -> dict[str, Any]:
    return {"domain": "d", "descriptors": [{"key": "k", "rate_limit": fields}]}


@pytest.mark.parametrize(
    ("document", "path", "problem"),
    [
        (
            {"domain": "d", "descriptors": [{"key": "k"}, {"key": "k"}]},
            "descriptors[1]",
            "duplicate of descriptors[0] (key 'k' without a value)",
        ),
        (
            {"domain": "d", "descriptors": [{"key": "k", "value": "a", "share_threshold": True}]},
            "descriptors[0].share_threshold",
            "only a wildcard value (holding '*') can share its counter",
        ),
        (
            in_rate_limit(unit="second", requests_per_unit="5"),
            "descriptors[0].rate_limit.requests_per_unit",
            "expected an integer, got str '5'",
        ),
        (
            in_rate_limit(unit="second", requests_per_unit={"n": 5}),
            "descriptors[0].rate_limit.requests_per_unit",
            "expected an integer, got a mapping",
        ),
        (
            in_rate_limit(unit="second", requests_per_unit=5, algorithm="leaky"),
            "descriptors[0].rate_limit.algorithm",
            "unknown algorithm 'leaky'; expected fixed_window or gcra",
        ),
        (
            {"domain": "d", "descriptors": [{"key": "k", "name": "x"}]},
            "descriptors[0].name",
            "unknown field in a descriptor (it belongs in a rate_limit)",
        ),
    ],
    ids=["duplicate", "share_threshold", "string count", "mapping count", "algorithm", "misplaced"],
)
def test_errors_in_full(document: dict[str, Any], path: str, problem: str) -> None:
    assert problem_of(document) == (path, problem)


def test_the_largest_count_envoy_can_carry_is_accepted() -> None:
    config = parse_config([("inline", in_rate_limit(unit="second", requests_per_unit=2**32 - 1))])
    assert rpu(config, "d", ("k", "v")) == 2**32 - 1


def test_a_merge_key_does_not_hide_a_repeated_key_after_it(tmp_path: Path) -> None:
    file = tmp_path / "merge.yaml"
    file.write_text("domain: d\ndescriptors:\n  - <<: {key: k}\n    value: a\n    value: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'value'"):
        load_config([file])


def test_yaml_the_reader_rejects_is_an_error_for_the_whole_file(tmp_path: Path) -> None:
    file = tmp_path / "control.yaml"
    file.write_text("domain: d\x07\n")
    with pytest.raises(ConfigError) as caught:
        load_config([file])
    err = caught.value
    assert (err.file, err.path) == (str(file), ".")
    assert err.problem.startswith("invalid YAML: unacceptable character")
