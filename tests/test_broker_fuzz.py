"""Fuzzing the broker's request parsing, its framing, and a live server.

- ``parse_call`` on any bytes returns a call or raises ``BadRequest``, nothing else;
- ``check_parameters`` on any JSON value raises only ``InvalidParameter``, and
  what it accepts has exactly the schema's types;
- the framing gives back the messages that were sent, however the stream is cut;
- a live server fed mutated calls with random descriptors answers each one
  with a reply or closes the connection, keeps no descriptor, leaves nothing
  bound, and still serves afterwards.

``LOOPDEV_LONG=1`` runs many more examples.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerlib import (
    Server,
    bound_under,
    call,
    make_image,
    poll,
    raw_connect,
    require_unprivileged,
    shared_dir,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loopdev
from loopdev import _varlink, broker

LONG = os.environ.get("LOOPDEV_LONG") == "1"
FUZZ = settings(
    max_examples=3000 if LONG else 300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LIVE_MESSAGES = 3000 if LONG else 300

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
METHODS = [*sorted(broker._SCHEMAS), "io.loopdev.Nope", "org.example.X", "", "io.loopdev."]


@FUZZ
@given(st.binary(max_size=300))
def test_parse_call_on_any_bytes(payload: bytes) -> None:
    try:
        parsed = _varlink.parse_call(payload)
    except _varlink.BadRequest:
        return
    assert isinstance(parsed.method, str) and parsed.method
    assert isinstance(parsed.parameters, dict) and isinstance(parsed.oneway, bool)


def _parameters(draw: st.DrawFn, method: str) -> dict[str, Any]:
    """Mostly the schema's names with values of any type, some unknown names."""
    schema = broker._SCHEMAS.get(method, {})
    names = st.sampled_from(sorted(schema)) if schema else st.text(max_size=8)
    keys = draw(st.lists(names | st.text(max_size=8), max_size=len(schema) + 2, unique=True))
    return {k: draw(json_values) for k in keys}


@st.composite
def calls(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(METHODS))
    obj: dict[str, Any] = {"method": method, "parameters": _parameters(draw, method)}
    if draw(st.booleans()):
        obj["oneway"] = draw(json_values)
    if draw(st.booleans()):
        obj[draw(st.text(max_size=6))] = draw(json_values)
    return json.dumps(obj).encode()


_PY_TYPES = {"int": (int,), "bool": (bool,), "string": (str,), "float": (int, float)}


@FUZZ
@given(calls())
def test_structured_calls_raise_only_typed_errors(payload: bytes) -> None:
    try:
        parsed = _varlink.parse_call(payload)
        schema = broker._SCHEMAS.get(parsed.method)
        if schema is None:
            return
        checked = _varlink.check_parameters(parsed.parameters, schema)
    except (_varlink.BadRequest, _varlink.InvalidParameter):
        return
    assert set(checked) == set(schema)
    for name, (kind, optional) in schema.items():
        value = checked[name]
        if value is None:
            assert optional
            continue
        assert isinstance(value, _PY_TYPES[kind]) and (kind == "bool") == (type(value) is bool)
        if kind == "int":
            assert -(2**63) <= value < 2**63


@FUZZ
@given(
    st.lists(st.binary(max_size=200).map(lambda b: b.replace(b"\0", b"")), max_size=8),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20),
)
def test_framing_gives_back_what_was_sent(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(m + b"\0" for m in messages)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pos, i = 0, 0
        while pos < len(stream):  # cut the stream into pieces of the drawn sizes
            size = cuts[i % len(cuts)]
            a.sendall(stream[pos : pos + size])
            pos, i = pos + size, i + 1
        a.close()
        conn = _varlink.Connection(b, max_message=1024, max_fds=4, timeout=5)
        got = []
        while (frame := conn.receive(idle_timeout=5)) is not None:
            assert frame.fds == [] and not frame.fds_dropped
            got.append(frame.payload)
        assert got == messages
    finally:
        a.close()
        b.close()


def test_descriptors_belong_to_their_message() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        socket.send_fds(a, [b"first\0"], [r])
        a.sendall(b"second\0")
        socket.send_fds(a, [b"third"], [w, w])
        a.sendall(b"\0")
        a.close()
        conn = _varlink.Connection(b, max_message=1024, max_fds=4, timeout=5)
        frames = []
        while (frame := conn.receive(idle_timeout=5)) is not None:
            frames.append(frame)
        assert [(f.payload, len(f.fds)) for f in frames] == [
            (b"first", 1),
            (b"second", 0),
            (b"third", 2),
        ]
        for f in frames:
            _varlink.close_fds(f.fds)
    finally:
        os.close(r)
        os.close(w)
        b.close()


# --- a live server -----------------------------------------------------------------


@pytest.fixture
def live(devices: None) -> Iterator[tuple[Server, Path]]:
    require_unprivileged()
    with shared_dir() as space:
        server = Server(space, "--allow-user", "nobody", "--timeout", "2")
        try:
            yield server, space
        finally:
            server.stop()
            assert poll(lambda: not bound_under(space), 3), bound_under(space)


_VALID = [
    {"method": "io.loopdev.Attach", "parameters": {"file": 0}},
    {"method": "io.loopdev.Attach", "parameters": {"file": 0, "read_only": True}},
    {"method": "io.loopdev.Attach", "parameters": {"file": 0, "partscan": True, "offset": 512}},
    {"method": "io.loopdev.Detach", "parameters": {"name": "loop0", "timeout": 0.1}},
    {"method": "io.loopdev.List", "parameters": {}},
    {"method": "org.varlink.service.GetInfo"},
    {"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "x"}},
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(0, 4)):
        choice = rng.random()
        pos = rng.randrange(len(data) + 1)
        if choice < 0.4 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif choice < 0.6:
            data[pos:pos] = rng.choice([b"{", b"}", b'"', b"[", b"0", b"-1e999", b"null", b","])
        elif choice < 0.8:
            del data[pos : pos + rng.randint(1, 8)]
        else:
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
    return bytes(data).replace(b"\0", b"")


def _descriptor_sources(space: Path) -> list[Callable[[], list[int]]]:
    image = make_image(space / "fuzz.img", size=1 << 20, owner=None)

    def file() -> list[int]:
        return [os.open(image, os.O_RDWR | os.O_CLOEXEC)]

    def read_only() -> list[int]:
        return [os.open(image, os.O_RDONLY | os.O_CLOEXEC)]

    def pipe() -> list[int]:
        return list(os.pipe())

    def directory() -> list[int]:
        return [os.open(space, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]

    def sockets() -> list[int]:
        a, b = socket.socketpair()
        return [a.detach(), b.detach()]

    def none() -> list[int]:
        return []

    return [file, read_only, pipe, directory, sockets, none, none]


def test_live_server_survives_mutated_calls(live: tuple[Server, Path]) -> None:
    server, space = live
    sources = _descriptor_sources(space)
    baseline = server.settled_fds()
    rng = random.Random(0x10DE7)
    outcomes = {"reply": 0, "closed": 0}
    sock = raw_connect(server.socket)
    conn = _varlink.Connection(sock, max_message=1 << 24, max_fds=253, timeout=10)
    try:
        for _ in range(LIVE_MESSAGES):
            payload = _mutate(rng, json.dumps(rng.choice(_VALID)).encode())
            fds = rng.choice(sources)()
            try:
                _send(sock, payload, fds)
                frame = conn.receive(idle_timeout=5)
            except (_varlink.ProtocolError, _varlink.IdleTimeout, OSError):
                frame = None
            finally:
                _varlink.close_fds(fds)
            if frame is None:  # closed, or a mutated call became oneway
                outcomes["closed"] += 1
                conn.close()
                sock = raw_connect(server.socket)
                conn = _varlink.Connection(sock, max_message=1 << 24, max_fds=253, timeout=10)
                continue
            reply = json.loads(frame.payload)
            assert isinstance(reply, dict) and ("parameters" in reply or "error" in reply)
            outcomes["reply"] += 1
            _varlink.close_fds(frame.fds)  # an Attach that got through: its device fds
    finally:
        conn.close()
    assert outcomes["reply"] > LIVE_MESSAGES // 2, outcomes
    assert poll(lambda: not bound_under(space), 3), bound_under(space)
    assert server.wait_fds(baseline) == baseline
    reply, _ = call(server.socket, "io.loopdev.List")
    assert reply == {"parameters": {"devices": []}}
    dev = loopdev.attach(space / "fuzz.img", broker=server.socket)
    dev.detach()


def _send(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    if fds:
        socket.send_fds(sock, [payload + b"\0"], fds)
    else:
        sock.sendall(payload + b"\0")


def test_live_server_with_many_clients_sending_garbage(live: tuple[Server, Path]) -> None:
    """Concurrent connections sending random bytes (some never finishing) do not wedge it."""
    server, space = live
    baseline = server.settled_fds()
    errors: list[BaseException] = []

    def garbage(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(20):
                sock = raw_connect(server.socket)
                try:
                    sock.sendall(rng.randbytes(rng.randint(0, 3000)))
                    if rng.random() < 0.5:
                        sock.sendall(b"\0")
                except OSError:
                    pass  # the server may hang up first
                finally:
                    sock.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=garbage, args=(seed,)) for seed in range(16)]
    for t in threads:
        t.start()
    # Served while the garbage flows.
    make_image(space / "ok.img", owner=None)
    for _ in range(5):
        loopdev.attach(space / "ok.img", broker=server.socket).detach()
    for t in threads:
        t.join()
    assert not errors
    assert server.wait_fds(baseline) == baseline
