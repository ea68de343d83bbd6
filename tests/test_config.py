"""Loading the YAML configuration: every mistake is a ConfigError with key path and line."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import textwrap
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipis import config as config_module
from sipis.config import (
    EX_CONFIG,
    ApiConfig,
    Config,
    ConfigError,
    DomainLifetimeConfig,
    ListenAddress,
    ListenConfig,
    default_config,
    format_config_error,
    load_config,
    load_config_text,
    parse_duration,
)

REPO = Path(__file__).resolve().parent.parent
BASE = Path("/srv/sipis")
# Appended to snippets that say nothing about the API: the default (TLS on, no certificate,
# no self_signed_dir) is deliberately not a working configuration.
NO_API_TLS = "\napi:\n  tls: {enabled: false}\n"


def load(text: str) -> Config:
    text = textwrap.dedent(text)
    if not re.search(r"^api:", text, re.MULTILINE):
        text += NO_API_TLS
    return load_config_text(text, base_dir=BASE)


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text)
    return info.value


# --- schema walking (shared by the docs and evolve tests) ------------------------------------


def _nested(tp: Any) -> tuple[str, type] | None:
    """('section'|'list'|'map', class) when a field holds config classes."""
    if isinstance(tp, type) and attrs.has(tp):
        return "section", tp
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is tuple and args and isinstance(args[0], type) and attrs.has(args[0]):
        return "list", args[0]
    if origin is Mapping and len(args) == 2 and isinstance(args[1], type) and attrs.has(args[1]):
        return "map", args[1]
    return None


def schema_leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf key path; "[]" stands for any list item, "{}" for any mapping key."""
    hints = typing.get_type_hints(cls, vars(config_module))
    out: list[tuple[str, ...]] = []
    for field in attrs.fields(cls):
        path = (*prefix, field.name)
        nested = _nested(hints[field.name])
        if nested is None:
            out.append(path)
        elif nested[0] == "section":
            out += schema_leaves(nested[1], path)
        elif nested[0] == "list":
            out += schema_leaves(nested[1], (*path, "[]"))
        else:
            out += schema_leaves(nested[1], (*path, "{}"))
    return out


def schema_classes(cls: type = Config) -> set[type]:
    hints = typing.get_type_hints(cls, vars(config_module))
    found: set[type] = {cls}
    for field in attrs.fields(cls):
        nested = _nested(hints[field.name])
        if nested is not None:
            found |= schema_classes(nested[1])
    return found


def present(node: yaml.Node, parts: tuple[str, ...]) -> bool:
    if not parts:
        return True
    head, rest = parts[0], parts[1:]
    if head == "[]":
        return isinstance(node, yaml.SequenceNode) and any(present(n, rest) for n in node.value)
    if not isinstance(node, yaml.MappingNode):
        return False
    if head == "{}":
        return any(present(v, rest) for _k, v in node.value)
    return any(k.value == head and present(v, rest) for k, v in node.value)


# --- the shipped files -----------------------------------------------------------------------


def test_the_example_config_loads() -> None:
    """conf/sipis.yaml loads without error (files it names need not exist)."""
    config = load_config(REPO / "conf" / "sipis.yaml")
    assert config.store.path == Path("/var/lib/sipis/sipis.db")
    assert config.store.create_key_file is False
    assert [item.transport for item in config.sip.listen] == ["udp", "tcp", "tls"]


def test_the_dev_config_is_the_embedded_default() -> None:
    """conf/dev.yaml (make run) equals default_config(repo root) and matches SPEC.md."""
    config = load_config(REPO / "conf" / "dev.yaml")
    assert config == default_config(REPO)
    assert config.store.backend == "sqlite"
    assert config.store.path == REPO / "var" / "sipis.db"
    assert config.store.key_file == REPO / "var" / "sipis.key"
    assert config.store.create_key_file is True
    assert config.api.tls.enabled and config.api.tls.self_signed_dir == REPO / "var" / "tls"
    assert config.api.listen == ListenAddress(host="127.0.0.1", port=8443)
    assert {(i.transport, i.host, i.port) for i in config.sip.listen} == {
        ("udp", "127.0.0.1", 5060), ("tcp", "127.0.0.1", 5060)}
    assert config.sip.public_host == "127.0.0.1"
    assert config.metrics.enabled and config.metrics.listen.port == 9460
    assert config.api.allowed_domains == ("*",) and config.api.allowed_apps == ("*",)
    assert config.push.provider == "log"


def test_the_example_config_sets_every_leaf_key_of_the_schema() -> None:
    """Every leaf of the attrs schema appears in conf/sipis.yaml, so the docs stay in step."""
    root = yaml.compose((REPO / "conf" / "sipis.yaml").read_text(), Loader=yaml.SafeLoader)
    assert root is not None
    leaves = schema_leaves(Config)
    assert len(leaves) > 60
    missing = [".".join(p) for p in leaves if not present(root, p)]
    assert missing == []


def test_every_key_in_the_example_config_has_a_comment() -> None:
    """Each key line of conf/sipis.yaml carries a comment or follows a comment line."""
    previous = ""
    uncommented = []
    for number, line in enumerate((REPO / "conf" / "sipis.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if (re.match(r"(- )?[\w.]+:", stripped) and "#" not in line
                and not previous.startswith("#")):
            uncommented.append(f"{number}: {line}")
        previous = stripped
    assert uncommented == []


# --- defaults and values ---------------------------------------------------------------------


def test_a_minimal_file_gives_every_default_with_paths_under_the_base_dir() -> None:
    """Absent keys take the documented defaults; relative default paths join the base dir."""
    config = load("")
    assert config.store.path == BASE / "var" / "sipis.db"
    assert config.store.key_file == BASE / "var" / "sipis.key"
    assert config.sip.timers.t1 == 0.5 and config.sip.timers.t2 == 4.0
    assert config.sip.tcp_idle_timeout == 600.0
    assert config.sip.user_agent.startswith("sipis/")
    assert config.registrar.backoff_cap == 1800.0
    assert config.lifetime.default == 3 * 86400 and config.lifetime.max == 6 * 86400
    assert config.lifetime.not_registered_max_age == 12 * 3600
    assert config.metrics.listen == ListenAddress(host="127.0.0.1", port=9460)
    assert config.shutdown_grace == 10.0
    assert config.push.apns is None


def test_empty_sections_and_an_empty_file_mean_defaults() -> None:
    """`log:` with everything commented out is null, which counts as an empty section."""
    assert load("log:\nsip:\n  dns:\n").sip.dns.nameservers == ()
    with pytest.raises(ConfigError, match="TLS is enabled"):
        load_config_text("# nothing\n", base_dir=BASE)


def test_relative_paths_resolve_against_the_config_file_directory(tmp_path: Path) -> None:
    """store.path "../var/x.db" in dir/conf/f.yaml is dir/var/x.db, whatever the cwd."""
    (tmp_path / "conf").mkdir()
    file = tmp_path / "conf" / "f.yaml"
    file.write_text("store: {path: ../var/x.db, key_file: /abs/key}\n" + NO_API_TLS)
    config = load_config(file)
    assert config.store.path == tmp_path / "var" / "x.db"
    assert config.store.key_file == Path("/abs/key")


def test_listen_items_are_parsed_and_tls_defaults_to_port_5061() -> None:
    """A tls listener takes cert/key and defaults to 5061; public_port is kept."""
    config = load("""
        sip:
          listen:
            - {transport: UDP, host: "[::1]", port: 0}
            - {transport: tls, cert_file: c.pem, key_file: k.pem, public_port: 443}
    """)
    udp, tls = config.sip.listen
    assert udp == ListenConfig(transport="udp", host="::1", port=0)
    assert tls.port == 5061 and tls.public_port == 443
    assert tls.cert_file == BASE / "c.pem" and tls.key_file == BASE / "k.pem"


def test_durations_accept_numbers_and_unit_strings() -> None:
    """Durations are seconds (int/float) or strings with ms/s/m/h/d/w units."""
    config = load("""
        sip: {timers: {t1: 0.25, t2: "4s", t4: 5000ms}, tcp_idle_timeout: 1h30m}
        lifetime: {default: 1d12h, max: 1w}
        shutdown_grace: 0
    """)
    assert config.sip.timers.t1 == 0.25 and config.sip.timers.t4 == 5.0
    assert config.sip.tcp_idle_timeout == 5400.0
    assert config.lifetime.default == 129600.0 and config.lifetime.max == 604800.0
    assert config.shutdown_grace == 0.0


@pytest.mark.parametrize(("value", "seconds"), [
    (30, 30.0), (0.5, 0.5), ("500ms", 0.5), ("30s", 30.0), ("10m", 600.0), ("12h", 43200.0),
    ("5d", 432000.0), ("1d12h", 129600.0), ("1w", 604800.0), ("90", 90.0), ("1.5s", 1.5),
    (" 2m ", 120.0), ("1m30s", 90.0), ("0s", 0.0),
])
def test_parse_duration_accepts_seconds_and_unit_strings(value: str | float,
                                                         seconds: float) -> None:
    """parse_duration turns every documented form into seconds."""
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    "", "5 days", "1y", "-1s", "s", "1.s", "1h-", "ms", -1, float("nan"), float("inf"),
    True, None, [1], "1e3s", 10**400,
])
def test_parse_duration_rejects_anything_else(value: Any) -> None:
    """Malformed, negative, non-finite and non-number values raise ValueError."""
    with pytest.raises(ValueError):
        parse_duration(value)


def test_hosts_domains_and_networks_are_normalised() -> None:
    """Host names and allow-list domains are lower-cased; CIDRs become network objects."""
    config = load("""
        sip:
          public_host: SIPIS.Example.COM
          dns: {nameservers: ["127.0.0.53", "::1"]}
          upstream_allow: ["127.0.0.0/8", "::1/128"]
        lifetime:
          domains:
            SIP.Example.NET: {max: 3d}
            10.0.0.1: {default: 1d}
        api:
          tls: {enabled: false}
          allowed_domains: ["Sip.Example.Net", "*.Example.ORG", "*"]
          allowed_apps: ["com.Example.phone", "*"]
          trusted_proxies: ["10.0.0.0/8"]
    """)
    assert config.sip.public_host == "sipis.example.com"
    assert config.sip.dns.nameservers == ("127.0.0.53", "::1")
    assert config.sip.upstream_allow == (ipaddress.ip_network("127.0.0.0/8"),
                                         ipaddress.ip_network("::1/128"))
    assert dict(config.lifetime.domains) == {
        "sip.example.net": DomainLifetimeConfig(max=3 * 86400.0),
        "10.0.0.1": DomainLifetimeConfig(default=86400.0),
    }
    assert config.api.allowed_domains == ("sip.example.net", "*.example.org", "*")
    assert config.api.allowed_apps == ("com.Example.phone", "*")


def test_push_apns_and_fcm_sections_are_typed() -> None:
    """push.apns/fcm are typed sections with their own required keys."""
    config = load("push: {provider: live, apns: {team_id: ABCDE12345, key_id: K1, "
                  "key_file: k.p8}}")
    assert config.push.apns is not None and config.push.apns.team_id == "ABCDE12345"
    assert config.push.apns.production_url == "https://api.push.apple.com"
    assert config.push.fcm is None
    assert error("push: {apns: {team_id: A}}").path == "push.apns.key_id"
    assert error("push: {fcm: {}}").path == "push.fcm.service_account_file"
    assert error("push: {provider: live}").path == "push.provider"

def test_metrics_disabled_frees_its_port() -> None:
    """The TCP port clash check skips a disabled metrics listener."""
    config = load("""
        api: {tls: {enabled: false}, listen: {port: 9460}}
        metrics: {enabled: false}
    """)
    assert config.api.listen.port == 9460


# --- errors: path, line and message ----------------------------------------------------------


def test_config_error_str_names_path_and_line() -> None:
    """str(ConfigError) is "Error in configuration at 'p' (line n): msg", parts optional."""
    assert str(ConfigError("must be an integer from 1 to 65535", "sip.listen[1].port", 14)) == (
        "Error in configuration at 'sip.listen[1].port' (line 14): "
        "must be an integer from 1 to 65535")
    assert str(ConfigError("bad", "log.level")) == "Error in configuration at 'log.level': bad"
    assert str(ConfigError("oops", "", 3)) == "Error in configuration (line 3): oops"
    assert EX_CONFIG == 78


def test_format_config_error_adds_the_file() -> None:
    """format_config_error is str(err), plus the file name when the error came from a file."""
    err = ConfigError("bad", "log.level", 2, file="/etc/sipis/sipis.yaml")
    assert format_config_error(err) == (
        "Error in configuration at 'log.level' (line 2): bad\n  in file /etc/sipis/sipis.yaml")
    assert format_config_error(ConfigError("bad", "x")) == str(ConfigError("bad", "x"))


def test_an_unknown_key_deep_in_the_tree_names_its_path_and_line() -> None:
    """A typo three levels down is reported with its full path, its line and a suggestion."""
    err = error("""
        log:
          level: info
        sip:
          public_host: 127.0.0.1
          dns:
            nameserver: [127.0.0.1]
    """)
    assert err.path == "sip.dns.nameserver"
    assert err.line == 7
    assert "did you mean 'nameservers'" in err.message


def test_an_unknown_top_level_key_lists_the_sections() -> None:
    """A key that matches nothing lists what the section knows."""
    err = error("zzz: 1\n")
    assert err.path == "zzz" and err.line == 1
    assert "shutdown_grace" in err.message


def test_a_bad_port_in_a_list_item_names_the_index_and_line() -> None:
    """sip.listen[1].port out of range → path with the index, the value's line."""
    err = error("""
        sip:
          listen:
            - transport: udp
              port: 5060
            - transport: tcp
              port: 70000
    """)
    assert err.path == "sip.listen[1].port"
    assert err.line == 7
    assert str(err) == ("Error in configuration at 'sip.listen[1].port' (line 7): "
                        "must be an integer from 1 to 65535 (or 0 for any free port)")


@pytest.mark.parametrize(("text", "path", "message"), [
    ("sip: {listen: [{transport: udp, port: '5060'}]}", "sip.listen[0].port", "integer"),
    ("sip: {listen: [{transport: udp, port: -1}]}", "sip.listen[0].port", "integer"),
    ("sip: {listen: [{transport: udp, port: true}]}", "sip.listen[0].port", "integer"),
    ("sip: {listen: [{transport: udp, port: 5060.5}]}", "sip.listen[0].port", "integer"),
    ("sip: {listen: {transport: udp}}", "sip.listen", "must be a list"),
    ("sip: {listen: []}", "sip.listen", "at least one"),
    ("sip: [1, 2]", "sip", "must be a mapping, not a list"),
    ("sip: {max_message_size: {a: 1}}", "sip.max_message_size", "not a mapping"),
    ("log: {level: loud}", "log.level", "one of: debug, info, warning, error"),
    ("log: {level: off}", "log.level", "quote it"),
    ("log: {format: 12}", "log.format", "one of: logfmt, json"),
    ("store: {backend: postgresql}", "store.backend", "not supported yet"),
    ("store: {backend: mysql}", "store.backend", "one of: sqlite"),
    ("store: {create_key_file: 'yes please'}", "store.create_key_file", "true or false"),
    ("store: {path: ''}", "store.path", "file path"),
    ("store: {path: 12}", "store.path", "file path"),
    ("sip: {public_host: 'bad host!'}", "sip.public_host", "host name or an IP"),
    ("sip: {public_host: 10.0.0.300}", "sip.public_host", "host name or an IP"),
    ("sip: {listen: [{transport: sctp}]}", "sip.listen[0].transport", "udp, tcp, tls"),
    ("sip: {listen: [{port: 5060}]}", "sip.listen[0].transport", "required"),
    ("sip: {listen: [{transport: udp, host: example.com}]}", "sip.listen[0].host", "IP address"),
    ("sip: {listen: [{transport: udp, public_port: 0}]}", "sip.listen[0].public_port", "1 to"),
    ("sip: {listen: [{transport: tls, cert_file: c.pem}]}", "sip.listen[0].key_file",
     "needs cert_file and key_file"),
    ("sip: {listen: [{transport: udp, cert_file: c.pem}]}", "sip.listen[0].cert_file",
     "only a tls listener"),
    ("sip: {listen: [{transport: udp}, {transport: tcp}, {transport: udp}]}", "sip.listen[2]",
     "same transport, host and port as listen[0]"),
    ("sip: {timers: {t1: 5 seconds}}", "sip.timers.t1", "duration such as"),
    ("sip: {timers: {t1: -1}}", "sip.timers.t1", "duration such as"),
    ("sip: {timers: {t1: 0}}", "sip.timers.t1", "more than zero"),
    ("sip: {timers: {t1: .nan}}", "sip.timers.t1", "duration such as"),
    ("sip: {timers: {t1: 400d}}", "sip.timers.t1", "at most 365d"),
    ("sip: {timers: {t1: 5s, t2: 1s}}", "sip.timers.t2", "shorter than t1"),
    ("sip: {max_message_size: 10}", "sip.max_message_size", "integer from 1024"),
    ("sip: {dns: {nameservers: [dns.example.com]}}", "sip.dns.nameservers[0]", "IP address"),
    ("sip: {dns: {nameservers: 127.0.0.1}}", "sip.dns.nameservers", "must be a list"),
    ("sip: {upstream_allow: [10.0.0.1/8]}", "sip.upstream_allow[0]", "host bits set"),
    ("sip: {upstream_allow: [everything]}", "sip.upstream_allow[0]", "network"),
    ("sip: {tls: {verify: 1}}", "sip.tls.verify", "true or false"),
    ("sip: {user_agent: \"sipis\\r\\nX-Evil: 1\"}", "sip.user_agent", "printable ASCII"),
    ("sip: {user_agent: ''}", "sip.user_agent", "printable ASCII"),
    ("registrar: {default_expires: 10}", "registrar.default_expires", "from 30 to 86400"),
    ("registrar: {default_expires: 30}", "registrar.default_expires",
     "between min_expires and max_expires"),
    ("registrar: {min_expires: 9000}", "registrar.min_expires", "not be more than max_expires"),
    ("registrar: {refresh_ratio: 0.99}", "registrar.refresh_ratio", "at most 0.95"),
    ("registrar: {refresh_ratio: '0.8'}", "registrar.refresh_ratio", "a number"),
    ("registrar: {backoff_base: 1h, backoff_cap: 30m}", "registrar.backoff_cap",
     "shorter than backoff_base"),
    ("registrar: {register_rate: 0}", "registrar.register_rate", "more than 0"),
    ("registrar: {register_burst: 0}", "registrar.register_burst", "from 1"),
    ("registrar: {auth_failures_before_give_up: 0}", "registrar.auth_failures_before_give_up",
     "from 1"),
    ("lifetime: {default: 7d}", "lifetime.default", "longer than lifetime.max"),
    ("lifetime: {domains: {sip.example.net: {max: 7d}}}",
     'lifetime.domains["sip.example.net"].max', "global cap"),
    ("lifetime: {domains: {sip.example.net: {max: 1d, default: 2d}}}",
     'lifetime.domains["sip.example.net"].default', "this domain's max"),
    ("lifetime: {domains: {sip.example.net: {maximum: 1d}}}",
     'lifetime.domains["sip.example.net"].maximum', "did you mean 'max'"),
    ("lifetime: {domains: {'not a domain': {max: 1d}}}", 'lifetime.domains["not a domain"]',
     "domain name"),
    ("lifetime: {domains: {A.example: {max: 1d}, a.EXAMPLE: {max: 2d}}}",
     'lifetime.domains["a.example"]', "duplicate domain"),
    ("lifetime: {domains: [a.example]}", "lifetime.domains", "must be a mapping"),
    ("api: {tls: {enabled: true}}", "api.tls", "self_signed_dir"),
    ("api: {tls: {cert_file: c.pem}}", "api.tls.key_file", "go together"),
    ("api: {tls: {enabled: false}, allowed_domains: []}", "api.allowed_domains",
     "must not be empty"),
    ("api: {tls: {enabled: false}, allowed_domains: ['*foo.com']}", "api.allowed_domains[0]",
     "a domain"),
    ("api: {tls: {enabled: false}, allowed_apps: ['com example']}", "api.allowed_apps[0]",
     "app id"),
    ("api: {tls: {enabled: false}, create_rate: {burst: 0}}", "api.create_rate.burst", "from 1"),
    ("api: {tls: {enabled: false}, max_body_bytes: 100}", "api.max_body_bytes", "from 1024"),
    ("api: {tls: {enabled: false}, device_registrar: http://x}", "api.device_registrar",
     "SIP URI"),
    ("api: {tls: {enabled: false}, listen: {port: 9460}}", "api.listen",
     "TCP port 9460 is also used by metrics.listen"),
    ("metrics: {listen: {port: 8443}}", "metrics.listen",
     "TCP port 8443 is already taken by api.listen"),
    ("api: {tls: {enabled: false}, listen: {host: 0.0.0.0, port: 5060}}", "api.listen",
     "already taken by sip.listen[1]"),
    ("push: {provider: apns}", "push.provider", "one of: log"),
    ("push: {apns: [a]}", "push.apns", "must be a mapping"),
    ("push: {apns: {a: 1, a: 2}}", "push.apns.a", "duplicate key"),
    ("push: {apns: {team_id: A, key_id: B, key_file: k, production_url: ftp://x}}",
     "push.apns.production_url", "http(s) URL"),
    ("metrics: {enabled: maybe}", "metrics.enabled", "true or false"),
    ("shutdown_grace: -1s", "shutdown_grace", "duration such as"),
])
def test_bad_values_name_the_key_path(text: str, path: str, message: str) -> None:
    """Each bad value is a ConfigError naming its key path, a line, and what is expected."""
    err = error(text)
    assert err.path == path
    assert message in err.message
    assert err.line is not None


def test_a_duplicate_key_is_an_error_with_both_lines() -> None:
    """Duplicate keys (which plain safe_load would silently merge) are refused."""
    err = error("""
        log:
          level: info
          format: json
          level: debug
    """)
    assert err.path == "log.level" and err.line == 5
    assert "first given on line 3" in err.message
    top = error("log: {}\nstore: {}\nlog: {}\n")
    assert top.path == "log" and top.line == 3


@pytest.mark.parametrize(("text", "line"), [
    ("log:\n  level: info\n bad indent: 1\n", 3),
    ("sip:\n  listen: [\n", 3),
    ("log:\n\tlevel: info\n", 2),
    ("log: {level: info\nstore: {}\n", 2),
    ("a: 'unterminated\n", 2),
    ("log: *nowhere\n", 1),
    ("---\nlog: {}\n---\nstore: {}\n", 3),
    ("ok: 1\nbad: \x07\n", 2),
])
def test_yaml_syntax_errors_are_config_errors_with_a_line(text: str, line: int) -> None:
    """Any YAML parse error becomes a ConfigError with the line of the problem."""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, base_dir=BASE)
    assert info.value.line == line
    assert info.value.message.startswith("YAML syntax error")


@pytest.mark.parametrize("text", ["- log\n", "just a string\n", "42\n", "null\n"])
def test_a_top_level_that_is_not_a_mapping_is_an_error(text: str) -> None:
    """The document must be a mapping of sections."""
    with pytest.raises(ConfigError, match="top level must be a mapping") as info:
        load_config_text(text, base_dir=BASE)
    assert info.value.line == 1


@pytest.mark.parametrize(("text", "path"), [
    ("shutdown_grace: !!python/object:os.system x\n", "shutdown_grace"),
    ("shutdown_grace: !custom 5\n", "shutdown_grace"),
    ("sip: {max_message_size: !!int abc}\n", "sip.max_message_size"),
    ("store: {create_key_file: !!bool perhaps}\n", "store.create_key_file"),
    ("shutdown_grace: !!timestamp soon\n", "shutdown_grace"),
    ("push: {apns: {key: !secret x}}\n", "push.apns.key"),
    ("push: {apns: {? [a]\n : b}}\n", "push.apns"),
    ("log: {? [a, b] : 1}\n", "log"),
])
def test_odd_yaml_tags_and_keys_are_config_errors(text: str, path: str) -> None:
    """Custom tags, python tags, unreadable tagged scalars and complex keys are refused."""
    err = error(text)
    assert err.path == path
    assert err.line is not None


def test_recursive_aliases_in_a_section_are_a_config_error() -> None:
    """An alias cycle inside push.apns is refused with a line rather than looping."""
    err = error("push:\n  apns: &a {self: *a}\n")
    assert (err.path, err.line) == ("push.apns.self", 2)


def test_deep_nesting_is_a_config_error() -> None:
    """Pathologically nested YAML gives a ConfigError, not a RecursionError."""
    with pytest.raises(ConfigError):
        load_config_text("push: {apns: " + "[" * 5000 + "]" * 5000 + "}", base_dir=BASE)


def test_load_config_reports_a_missing_file() -> None:
    """A missing file is a ConfigError naming the file (so the CLI exits 78)."""
    with pytest.raises(ConfigError, match="file not found") as info:
        load_config("/nonexistent/sipis.yaml")
    assert info.value.file == "/nonexistent/sipis.yaml"
    assert "in file /nonexistent/sipis.yaml" in format_config_error(info.value)


def test_load_config_reports_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are a ConfigError, not a UnicodeDecodeError."""
    file = tmp_path / "bad.yaml"
    file.write_bytes(b"log: {level: \xff}\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(file)


def test_load_config_puts_the_file_name_on_value_errors(tmp_path: Path) -> None:
    """Errors inside the file carry its name as well as path and line."""
    file = tmp_path / "x.yaml"
    file.write_text("\nlog:\n  level: loud\n")
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert (info.value.path, info.value.line, info.value.file) == ("log.level", 3, str(file))


# --- the attrs tree --------------------------------------------------------------------------


def _class_name(cls: type) -> str:
    return cls.__qualname__


CONFIG_CLASSES: list[type] = sorted(schema_classes(), key=_class_name)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=_class_name)
def test_every_config_class_is_frozen_and_evolvable(cls: type) -> None:
    """attrs.evolve works on every section class, and instances cannot be mutated."""
    instance = cls()
    first = attrs.fields(cls)[0]
    assert attrs.evolve(instance) == instance
    changed = attrs.evolve(instance, **{first.name: getattr(instance, first.name)})
    assert changed == instance
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(instance, first.name, None)


def test_evolve_on_a_loaded_config_replaces_one_section() -> None:
    """The daemon swaps sections with attrs.evolve on SIGHUP."""
    config = default_config(BASE)
    api = attrs.evolve(config.api, listen=ListenAddress(host="127.0.0.1", port=0))
    new = attrs.evolve(config, api=api)
    assert new.api.listen.port == 0 and new.sip == config.sip
    assert isinstance(new.api, ApiConfig)


# --- property tests: only ConfigError ever escapes -------------------------------------------

SCALARS = (
    st.none() | st.booleans() | st.integers(-5, 70000) | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["30s", "1d12h", "500ms", "0", "tls", "udp", "tcp", "127.0.0.1", "::1",
                       "0.0.0.0", "*", "*.example.com", "sqlite", "postgresql", "log", "debug",
                       "json", "sip.example.net", "10.0.0.0/8", "c.pem", "sip:x.example"])
)


def _junk() -> st.SearchStrategy[Any]:
    return st.recursive(
        SCALARS,
        lambda inner: st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8) | SCALARS.filter(lambda v: v is not None
                                                               and not isinstance(v, float)),
                          inner, max_size=3),
        max_leaves=8,
    )


def _schema_shaped(cls: type, depth: int = 0) -> st.SearchStrategy[Any]:
    """Mostly the right keys with plausible or junk values, so validation runs deep."""
    hints = typing.get_type_hints(cls, vars(config_module))
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in attrs.fields(cls):
        nested = _nested(hints[field.name])
        if nested is None or depth > 3:
            optional[field.name] = _junk()
        elif nested[0] == "section":
            optional[field.name] = _schema_shaped(nested[1], depth + 1) | _junk()
        elif nested[0] == "list":
            optional[field.name] = st.lists(_schema_shaped(nested[1], depth + 1), max_size=3)
        else:
            optional[field.name] = st.dictionaries(
                st.sampled_from(["a.example", "A.EXAMPLE", "bad domain", "10.0.0.1"]),
                _schema_shaped(nested[1], depth + 1), max_size=2)
    return st.fixed_dictionaries({}, optional=optional)


YAML_CHARS = st.sampled_from(list("{}[]:-,&*!|>'\"#%@` \n\tab01.?~=<"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text() | st.text(alphabet=YAML_CHARS, max_size=60))
def test_arbitrary_text_only_ever_raises_config_error(text: str) -> None:
    """Whatever the text, load_config_text returns a Config or raises ConfigError."""
    with contextlib.suppress(ConfigError):
        load_config_text(text, base_dir=BASE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_schema_shaped(Config) | _junk())
def test_arbitrary_yaml_structures_only_ever_raise_config_error(data: Any) -> None:
    """Any dumped YAML structure loads to a Config or raises ConfigError with a path or line."""
    text = yaml.safe_dump(data, allow_unicode=True)
    try:
        config = load_config_text(text, base_dir=BASE)
    except ConfigError as exc:
        assert exc.path or exc.line is not None or "TLS is enabled" in exc.message
    else:
        assert isinstance(config, Config)
