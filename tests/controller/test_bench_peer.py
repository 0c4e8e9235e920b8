"""The peer comparison's pure parts: the Socket.IO framing, the table and its ratios.

No fleet, no node: frames are the protocol's own, as the peer's server sends them."""

from __future__ import annotations

import math

import pytest

from bench import sio
from bench.peer_bench import Figures, Row, comparison, ratio_lines, saturation_point, table
from bench.peer_fleet import parse_print_uris


def test_decode_open_and_ping() -> None:
    """Engine.IO's open carries the server's settings; a ping is type 2."""
    opened = sio.decode('0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000}')
    assert opened.engine == sio.OPEN
    assert opened.data["pingInterval"] == 25000
    assert sio.decode("2").engine == sio.PING


def test_decode_event_with_offset() -> None:
    """A broadcast event: its name, its arguments, the offset last."""
    packet = sio.decode('42["message","hi there","1796623642486-0"]')
    assert (packet.engine, packet.kind, packet.namespace) == (sio.MESSAGE, sio.EVENT, "/")
    assert packet.event == ("message", ["hi there", "1796623642486-0"])


def test_decode_namespace_and_ack() -> None:
    """A namespace before the comma, an ack id before the payload."""
    packet = sio.decode('42/chat,17["message","x"]')
    assert packet.namespace == "/chat"
    assert packet.ack == 17
    assert packet.event == ("message", ["x"])


@pytest.mark.parametrize("frame", ["", "x", "9", "4", "4x", b"\x04", '45-["a",{}]'])
def test_decode_refuses_what_is_not_a_packet(frame: str | bytes) -> None:
    """Garbage, empty messages and binary packets are refused, never misread."""
    with pytest.raises(ValueError, match=r"not an? |binary"):
        sio.decode(frame)


def test_encode_event() -> None:
    assert sio.encode_event("message", "a b") == '42["message","a b"]'


def test_session_recovers_with_pid_and_offset() -> None:
    """The first CONNECT asks nothing; a reconnect names the session and the last offset
    seen, and counts whether the server gave the same session back."""
    session = sio.Session()
    assert session.connect_frame() == "40"
    assert session.connected(sio.decode('40{"sid":"s1","pid":"P"}')) is False
    session.seen(["hello", {"instance": "h:1"}])  # not an offset: the last argument is no string
    assert session.offset is None
    session.seen(["text", "1-0"])
    assert session.connect_frame() == '40{"pid":"P","offset":"1-0"}'
    assert session.connected(sio.decode('40{"sid":"s2","pid":"P"}')) is True
    session.seen(["text", "2-0"])
    assert session.connected(sio.decode('40{"sid":"s3","pid":"Q"}')) is False
    assert (session.recoveries, session.lost, session.pid) == (1, 1, "Q")


def test_row_ratio_and_direction() -> None:
    """kit/peer, and whether the kit at least matches, by the figure's better direction."""
    assert Row("x", 10.0, 20.0, higher_is_better=False).kit_ahead is True
    assert Row("x", 10.0, 20.0, higher_is_better=True).kit_ahead is False
    assert Row("x", 10.0, 20.0, True).ratio == 0.5
    assert math.isinf(Row("x", 3.0, 0.0, False).ratio)
    assert math.isnan(Row("x", 0.0, 0.0, False).ratio)
    assert Row("x", math.nan, 1.0, True).kit_ahead is None


def test_comparison_table_and_ratio_lines() -> None:
    """Every row both measured gets a ratio line naming the peer; the table marks where
    the kit is behind, and leaves out nothing."""
    kit = Figures(idle_kib=14.0, handshakes=900.0, restart={"missed per member": 0.0})
    peer = Figures(idle_kib=28.0, handshakes=1200.0, restart={"missed per member": 3.0})
    rows = comparison(kit, peer)
    lines = ratio_lines(rows, "socketio")
    assert "ratio idle KiB per connection (app + broker) wsfleet/socketio: 0.50" in lines
    assert "ratio handshakes/s wsfleet/socketio: 0.75" in lines
    assert "ratio restart: missed per member wsfleet/socketio: 0.00" in lines
    assert not any("saturation" in line for line in lines)  # measured by neither
    rendered = table(rows, "socketio")
    assert len(rendered) == len(rows) + 2
    handshake_line = next(line for line in rendered if line.startswith("| handshakes/s"))
    assert "**behind**" in handshake_line
    idle_line = next(line for line in rendered if line.startswith("| idle KiB per connection (app"))
    assert idle_line.endswith("| yes |")


def test_saturation_point() -> None:
    """The most deliveries/s with p99 under 100 ms and under 1% lost."""
    runs = [
        (200.0, 12000.0, 5.0, 0.0),
        (1000.0, 60000.0, 80.0, 0.0),
        (2000.0, 90000.0, 150.0, 0.0),  # p99 too high
        (3000.0, 95000.0, 50.0, 0.05),  # too many lost
    ]
    assert saturation_point(runs) == (1000.0, 60000.0)
    assert saturation_point([(200.0, 1.0, 120.0, 0.0)]) is None


def test_parse_print_uris() -> None:
    """apt-get --print-uris lines: the archives a host lacks, with the hash apt names
    (SHA256 or none on bookworm, MD5Sum on trixie)."""
    sha, md5 = "a" * 64, "b" * 32
    text = (
        f"'http://deb.example/pool/main/n/nodejs/nodejs_18.19.0_amd64.deb' "
        f"nodejs_18.19.0_amd64.deb 123 SHA256:{sha}\n"
        "Reading package lists...\n"
        f"'http://deb.example/pool/main/r/redis/redis-server_8.0.2-3%2bdeb13u3_amd64.deb' "
        f"redis-server_5%3a8.0.2-3+deb13u3_amd64.deb 67364 MD5Sum:{md5}\n"
        "'http://deb.example/debian-security/pool/updates/main/n/nodejs/libnode108_18.deb' "
        "libnode108_18.deb 10633176 \n"
    )
    assert parse_print_uris(text) == [
        ("http://deb.example/pool/main/n/nodejs/nodejs_18.19.0_amd64.deb",
         "nodejs_18.19.0_amd64.deb", "sha256", sha),
        ("http://deb.example/pool/main/r/redis/redis-server_8.0.2-3%2bdeb13u3_amd64.deb",
         "redis-server_5%3a8.0.2-3+deb13u3_amd64.deb", "md5", md5),
        ("http://deb.example/debian-security/pool/updates/main/n/nodejs/libnode108_18.deb",
         "libnode108_18.deb", "", ""),
    ]  # fmt: skip
