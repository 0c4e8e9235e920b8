"""Pure logic of the app: settings from the environment, the client address behind proxies."""

from __future__ import annotations

import ipaddress
import os
import socket
import string

import pytest

from app import systemd
from app.config import build_parser, parse_settings
from app.rooms import subject_token
from app.server import client_address

TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


def test_environment_supplies_defaults_and_options_override_it() -> None:
    """APP_* variables set the defaults; a command-line option wins over them."""
    env = {"APP_PORT": "9001", "APP_ALLOWED_ORIGINS": "https://a, https://b", "APP_MAX_SIZE": "5"}
    settings = parse_settings(["--max-size", "7"], environ=env)
    assert settings.port == 9001
    assert settings.allowed_origins == ("https://a", "https://b")
    assert settings.max_size == 7


def test_forwarded_for_is_believed_only_from_a_trusted_proxy() -> None:
    """X-Forwarded-For from an untrusted peer is ignored; from a proxy, its client is used."""
    assert client_address("203.0.113.9", "198.51.100.1", TRUSTED) == "203.0.113.9"
    assert client_address("127.0.0.1", "198.51.100.1", TRUSTED) == "198.51.100.1"


def test_forwarded_for_takes_the_rightmost_untrusted_hop() -> None:
    """A client cannot spoof its address by prepending to X-Forwarded-For."""
    header = "1.2.3.4, 198.51.100.1, 10.0.0.5"
    assert client_address("127.0.0.1", header, TRUSTED) == "198.51.100.1"


def test_release_label_is_version_label_and_app_version() -> None:
    """The release label is --version-label on the command line and APP_VERSION in the env."""
    assert parse_settings([], environ={"APP_VERSION": "1.2.3"}).version == "1.2.3"
    assert parse_settings(["--version-label", "2.0"], environ={}).version == "2.0"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("APP_COMPRESSION", "gzip"),
        ("APP_COMPRESSION_WINDOW_BITS", "8"),
        ("APP_COMPRESSION_WINDOW_BITS", "16"),
        ("APP_COMPRESSION_MEMLEVEL", "0"),
        ("APP_COMPRESSION_MEMLEVEL", "10"),
        ("APP_LOG_FORMAT", "xml"),
        ("APP_DRAIN_TIMEOUT", "0"),
        ("APP_DRAIN_SPREAD", "-1"),
        ("APP_DRAIN_SPREAD", "10"),  # not less than the drain timeout (10 s)
    ],
)
def test_invalid_environment_values_are_rejected(variable: str, value: str) -> None:
    """A value argparse would let through as a default still fails with exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse_settings([], environ={variable: value})
    assert exit_info.value.code == 2


def test_deflate_window_and_memlevel_come_from_the_environment() -> None:
    """APP_COMPRESSION_WINDOW_BITS and APP_COMPRESSION_MEMLEVEL, at their limits too."""
    for bits, level in (("9", "1"), ("15", "9")):
        env = {"APP_COMPRESSION_WINDOW_BITS": bits, "APP_COMPRESSION_MEMLEVEL": level}
        settings = parse_settings([], environ=env)
        assert (settings.compression_window_bits, settings.compression_memlevel) == (
            int(bits), int(level),
        )  # fmt: skip


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET starting with '@' names an abstract socket, as systemd sets it."""
    name = f"wsfleet-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1\nSTATUS=test")
        assert receiver.recv(1024) == b"READY=1\nSTATUS=test"


def test_notify_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd (no NOTIFY_SOCKET) notify() says so and sends nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")


def test_bus_options_come_from_the_environment() -> None:
    """APP_BUS_URL (comma-separated), APP_BUS_TOKEN, APP_BUS_PREFIX and APP_INSTANCE."""
    env = {
        "APP_BUS_URL": "nats://127.0.0.1:4222, nats://127.0.0.1:4223",
        "APP_BUS_TOKEN": "s3cret",
        "APP_BUS_PREFIX": "chat.eu",
        "APP_INSTANCE": "fleet1:8001",
    }
    settings = parse_settings([], environ=env)
    assert settings.bus_url == ("nats://127.0.0.1:4222", "nats://127.0.0.1:4223")
    assert (settings.bus_token, settings.bus_prefix, settings.instance) == (
        "s3cret", "chat.eu", "fleet1:8001",
    )  # fmt: skip
    defaults = parse_settings([], environ={})
    assert (defaults.bus_url, defaults.bus_token, defaults.bus_prefix, defaults.instance) == (
        (), "", "wsapp", "",
    )  # fmt: skip


def test_help_never_shows_the_bus_token() -> None:
    """--help prints every default, read from APP_*: except the token's."""
    text = build_parser({"APP_BUS_TOKEN": "s3cret"}).format_help()
    assert "APP_BUS_TOKEN" in text
    assert "s3cret" not in text


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("APP_BUS_URL", "127.0.0.1:4222"),
        ("APP_BUS_URL", "redis://127.0.0.1"),
        ("APP_BUS_PREFIX", "a.*"),
        ("APP_BUS_PREFIX", "a..b"),
        ("APP_BUS_PREFIX", "with space"),
        ("APP_BUS_CA", "/nonexistent/ca.crt"),
    ],
)
def test_bad_bus_settings_are_rejected(variable: str, value: str) -> None:
    """A bus URL that is not nats:// or tls://, a prefix that is no subject, a CA file
    that cannot be read: exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse_settings([], environ={variable: value})
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("lobby", "lobby"),
        ("Team_1-b", "Team_1-b"),
        ("a.b", "a~2Eb"),
        ("*", "~2A"),
        (">", "~3E"),
        ("a b", "a~20b"),
        ("~", "~7E"),
        ("é", "~C3~A9"),
        ("", "~"),
    ],
)
def test_room_names_become_subject_tokens(name: str, token: str) -> None:
    """A room name of any characters is one NATS subject token: no '.', '*', '>', space."""
    assert subject_token(name) == token


def test_distinct_room_names_get_distinct_tokens() -> None:
    """The encoding is one to one: names that differ never share a subject."""
    names = ["a.b", "a~2Eb", "a~2eb", "~", "", "~7E", "A.B", "a b", "a_b", "\udc80", "é", "e"]
    tokens = [subject_token(name) for name in names]
    assert len(set(tokens)) == len(names)
    allowed = set(string.ascii_letters + string.digits + "-_~")
    assert all(set(token) <= allowed for token in tokens)
