"""Outputs (realtime/sinks.py): schema, same events on every output, slow consumers, flushing, shutdown, faults.

Everything binds 127.0.0.1 only. No assertion is about time: waits have generous deadlines and only guard
against a hang; what is asserted is counts, sequence numbers and bytes.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable

import jsonschema
import pytest

from realtime.events import EVENT_SCHEMA, AudioPresence, EmotionEvent, Presence, TextPresence, VisionPresence
from realtime.sinks import (
    CallbackSink,
    JsonlSink,
    LslSink,
    OscSink,
    Sink,
    SinkError,
    SinkGroup,
    WebSocketSink,
    parse_host_port,
)

LABELS = ["neutral", "happy", "sad", "angry", "surprise"]
HEADS = ["regression", "classification"]


def make_event(seq: int, head: str = "classification", text: str | None = None) -> EmotionEvent:
    """A plausible event; modalities come and go with seq so every presence combination shows up."""
    if head == "regression":
        scores = {"valence": round(math.sin(seq / 3), 4)}
    else:
        logits = [math.cos(seq + i) for i in range(len(LABELS))]
        total = sum(math.exp(x) for x in logits)
        scores = {label: math.exp(x) / total for label, x in zip(LABELS, logits, strict=True)}
    face = seq % 3 != 0
    words = seq % 4 != 0
    presence = Presence(
        vision=VisionPresence(present=face, face=[40 + seq, 30, 120, 140] if face else None, frames=8 if face else 0),
        audio=AudioPresence(present=True, voiced=seq % 2 == 0, seconds=min(4.0, 0.5 * seq)),
        text=TextPresence(present=words, text=(text if text is not None else "ça va, très bien 好") if words else "",
                          tokens=7 if words else 0, tail="and you"),
    )
    latency = {"capture_to_emit": 20.0 + seq, "vision": 4.5, "audio": 6.25, "text": 1.5, "fusion": 0.75, "asr": 310.0}
    return EmotionEvent(seq=seq, t_media=seq * 0.25, t_wall=1.7e9 + seq * 0.25, t_mono=time.monotonic(), head=head,
                        scores=scores, presence=presence, latency_ms=latency, untrained=True, skipped_ticks=seq // 5)


def wait_until(condition: Callable[[], bool], what: str, deadline_s: float = 15.0) -> None:
    """Polls `condition`; the deadline only turns a hang into a failure, it is not a performance check."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.005)


def sink_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mcihn-")]


class OscReceiver:
    """python-osc's ThreadingOSCUDPServer on 127.0.0.1, any free port, recording (address, args)."""

    def __init__(self):
        from pythonosc.dispatcher import Dispatcher
        from pythonosc.osc_server import ThreadingOSCUDPServer

        self.messages: list[tuple[str, tuple]] = []
        self._lock = threading.Lock()
        dispatcher = Dispatcher()
        dispatcher.set_default_handler(self._record)
        self.server = ThreadingOSCUDPServer(("127.0.0.1", 0), dispatcher)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def _record(self, address: str, *args) -> None:
        with self._lock:
            self.messages.append((address, args))

    def of(self, address: str) -> list[tuple]:
        with self._lock:
            return [args for a, args in self.messages if a == address]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_events_validate_against_schema():
    for head in HEADS:
        for seq in range(12):
            jsonschema.validate(json.loads(make_event(seq, head).to_json()), EVENT_SCHEMA)
    bare = EmotionEvent(seq=0, t_media=0.0, t_wall=0.0, t_mono=0.0, head="regression", scores={"valence": 0.0},
                        presence=Presence(), latency_ms={"capture_to_emit": 0.0})
    jsonschema.validate(bare.to_dict(), EVENT_SCHEMA)
    broken = make_event(1).to_dict()
    del broken["latency_ms"]["capture_to_emit"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, EVENT_SCHEMA)


def test_shipped_schema_file_is_the_schema():
    """realtime/event.schema.json (for consumers in other languages) is EVENT_SCHEMA, regenerated with
    `python -m realtime.events > realtime/event.schema.json` whenever the schema changes."""
    from importlib.resources import files

    from realtime.events import SCHEMA_FILE, SCHEMA_VERSION

    shipped = json.loads(files("realtime").joinpath(SCHEMA_FILE).read_text())
    assert shipped == json.loads(json.dumps(EVENT_SCHEMA)) and str(SCHEMA_VERSION) in shipped["title"]


@pytest.mark.parametrize("head", HEADS)
def test_every_output_gets_the_same_events(tmp_path, head):
    from websockets.sync.client import connect

    threads_before = set(threading.enumerate())
    osc = OscReceiver()
    received: list[EmotionEvent] = []
    jsonl = tmp_path / "out" / "events.jsonl"
    ws_sink = WebSocketSink(port=0)
    group = SinkGroup([JsonlSink(jsonl), ws_sink, OscSink("127.0.0.1", osc.port), CallbackSink(received.append)])
    group.open()
    assert ws_sink.port != 0
    events = [make_event(seq, head) for seq in range(20)]
    expected = [event.to_json() for event in events]
    with connect(ws_sink.url, open_timeout=10) as client:
        wait_until(lambda: ws_sink.clients == 1, "the WebSocket client to be registered")
        for event in events:
            group.send(event)
        # JSONL: flushed per event, so readable in full before close.
        assert jsonl.read_text(encoding="utf-8").splitlines() == expected
        ws_messages = [client.recv(timeout=15) for _ in events]
        wait_until(lambda: len(osc.of("/mcihn/event")) == len(events), "all OSC events")
        wait_until(lambda: len(received) == len(events), "all callbacks")
        group.close()
    osc.close()

    assert ws_messages == expected
    assert received == events
    for line in expected:
        jsonschema.validate(json.loads(line), EVENT_SCHEMA)
    # OSC: the same JSON; the threaded server may record datagrams out of order, so compare by seq.
    osc_json = sorted((args[0] for args in osc.of("/mcihn/event")), key=lambda s: json.loads(s)["seq"])
    assert osc_json == expected
    assert sorted(args[0] for args in osc.of("/mcihn/seq")) == list(range(20))
    for label in events[0].scores:
        got = sorted(args[0] for args in osc.of(f"/mcihn/score/{label}"))
        assert got == pytest.approx(sorted(e.scores[label] for e in events), abs=1e-6)  # float32 on the wire
    flags = sorted(osc.of("/mcihn/presence"))
    assert flags == sorted((int(e.presence.vision.present), int(e.presence.audio.voiced), int(e.presence.text.present))
                           for e in events)
    latencies = sorted(args[0] for args in osc.of("/mcihn/latency"))
    assert latencies == pytest.approx(sorted(e.latency_ms["capture_to_emit"] for e in events))

    assert group.failed == {} and group.dropped == 0
    assert all(s["sent"] == 20 for s in group.stats().values())
    wait_until(lambda: set(threading.enumerate()) <= threads_before, "threads to end")
    assert set(threading.enumerate()) == threads_before


def _stalled_ws_client(port: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads, with a tiny receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(15)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)  # byte by byte: read the response headers and nothing after them
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def test_slow_websocket_client_loses_events_without_stalling_send():
    from websockets.sync.client import connect

    sink = WebSocketSink(port=0, queue_size=4).open()
    stalled = _stalled_ws_client(sink.port)
    with connect(sink.url, open_timeout=10) as fast:
        wait_until(lambda: sink.clients == 2, "both clients to be registered")
        big = "x" * 32_768  # big events fill the stalled client's socket buffers after a few dozen
        sent = 0
        while sink.dropped == 0 and sent < 3000:
            sink.send(make_event(sent, text=big))
            # Lockstep with the fast client: its queue never holds more than one event, so it never drops.
            assert json.loads(fast.recv(timeout=15))["seq"] == sent
            sent += 1
        assert sink.dropped > 0, "the stalled client never filled its queue"
        assert sink.sent == sent  # every send was accepted while a client did not read at all

        # Further sends keep reaching the fast client while the stalled one keeps losing its oldest events.
        before = sink.dropped
        for seq in range(sent, sent + 10):
            sink.send(make_event(seq, text=big))
            assert json.loads(fast.recv(timeout=15))["seq"] == seq
        assert sink.dropped > before
        sink.close(timeout=1.0)  # with the stalled client still connected
    stalled.close()
    assert sink_threads() == []


def test_jsonl_flushed_after_each_event_and_appends(tmp_path):
    path = tmp_path / "a" / "b" / "events.jsonl"  # parent folders are created
    sink = JsonlSink(path).open()
    for seq in range(3):
        sink.send(make_event(seq, "regression"))
        lines = path.read_text(encoding="utf-8").splitlines()  # before close: already on disk (in the OS)
        assert [json.loads(line)["seq"] for line in lines] == list(range(seq + 1))
    sink.close()
    sink.close()  # twice is harmless
    with JsonlSink(path) as again:  # a rerun appends, never destroys a recording
        again.send(make_event(0, "regression"))
    assert [json.loads(line)["seq"] for line in path.read_text(encoding="utf-8").splitlines()] == [0, 1, 2, 0]


def test_jsonl_unwritable_path_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(SinkError) as err:
        JsonlSink(blocker / "events.jsonl").open()
    message = str(err.value)
    assert "events.jsonl" in message and "\n" not in message


def test_websocket_port_in_use_is_one_clear_error():
    threads_before = set(threading.enumerate())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SinkError) as err:
            WebSocketSink(port=port).open()
    message = str(err.value)
    assert "address already in use" in message and str(port) in message and "\n" not in message
    assert set(threading.enumerate()) == threads_before


def test_websocket_late_client_gets_events_from_then_on():
    from websockets.sync.client import connect

    sink = WebSocketSink(port=0).open()
    sink.send(make_event(0))  # nobody listening: goes nowhere, costs nothing
    with connect(sink.url, open_timeout=10) as client:
        wait_until(lambda: sink.clients == 1, "the client to be registered")
        sink.send(make_event(1))
        assert json.loads(client.recv(timeout=15))["seq"] == 1
    wait_until(lambda: sink.clients == 0, "the client to be unregistered")
    sink.close()
    assert sink_threads() == []


def test_websocket_close_flushes_queued_events():
    from websockets.exceptions import ConnectionClosedOK
    from websockets.sync.client import connect

    sink = WebSocketSink(port=0).open()
    with connect(sink.url, open_timeout=10, max_queue=64) as client:
        wait_until(lambda: sink.clients == 1, "the client to be registered")
        for seq in range(10):
            sink.send(make_event(seq))
        sink.close()  # right away: what was sent still reaches the client, then a clean close
        got = [json.loads(client.recv(timeout=15))["seq"] for _ in range(10)]
        with pytest.raises(ConnectionClosedOK):
            client.recv(timeout=15)
    assert got == list(range(10))
    assert sink_threads() == []


def test_callback_exceptions_are_reported_once_and_isolated():
    reports: list[str] = []
    seen: list[int] = []

    def flaky(event: EmotionEvent) -> None:
        seen.append(event.seq)
        if event.seq % 2:
            raise ValueError(f"bad event\nwith a second line {event.seq}")

    sink = CallbackSink(flaky, report=reports.append).open()
    for seq in range(6):
        sink.send(make_event(seq))
    sink.close()  # flushes the queue before joining
    assert seen == list(range(6))
    assert sink.errors == 3
    assert len(reports) == 1 and "ValueError: bad event" in reports[0] and "\n" not in reports[0]
    assert sink_threads() == []


def test_group_disables_a_failing_sink_and_keeps_the_others():
    class Broken(Sink):
        calls = 0

        def send(self, event: EmotionEvent) -> None:
            Broken.calls += 1
            raise OSError("disk on fire")

    reports: list[str] = []
    got: list[int] = []
    group = SinkGroup([Broken(), CallbackSink(lambda e: got.append(e.seq))], report=reports.append).open()
    for seq in range(5):
        group.send(make_event(seq))
    group.close()
    assert Broken.calls == 1
    assert got == list(range(5))
    assert len(reports) == 1 and "Broken" in reports[0] and "disk on fire" in reports[0]
    assert group.failed == {"Broken": "OSError: disk on fire"}
    assert sink_threads() == []


def test_group_open_failure_closes_what_was_opened(tmp_path):
    (tmp_path / "file.txt").write_text("")
    ws = WebSocketSink(port=0)
    group = SinkGroup([ws, JsonlSink(tmp_path / "file.txt" / "x.jsonl")])
    with pytest.raises(SinkError):
        group.open()
    assert sink_threads() == []


def test_close_returns_even_when_a_callback_hangs():
    release = threading.Event()
    reports: list[str] = []
    group = SinkGroup([CallbackSink(lambda e: release.wait(30), report=reports.append)])
    group.open()
    group.send(make_event(0))
    group.send(make_event(1))
    group.close(timeout=0.2)  # returns although the callback has not
    assert len(reports) == 1 and "left behind" in reports[0]
    release.set()  # let the abandoned worker finish: it exits without delivering the queued event
    wait_until(lambda: sink_threads() == [], "the abandoned callback thread to end")


def test_parse_host_port():
    assert parse_host_port("8765") == ("127.0.0.1", 8765)
    assert parse_host_port(":8765") == ("127.0.0.1", 8765)
    assert parse_host_port("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_host_port("localhost:0") == ("localhost", 0)
    assert parse_host_port("[::1]:8765") == ("::1", 8765)
    for bad in ["", "host", "host:port", "1:2:3", "127.0.0.1:70000", "-1"]:
        with pytest.raises(ValueError, match="bad address"):
            parse_host_port(bad)


def test_osc_label_sanitized():
    event = make_event(0, "classification")
    event.scores = {"very happy": 0.5, "a/b": 0.5}
    addresses = [address for address, _ in OscSink("127.0.0.1", 9).messages(event)]
    assert "/mcihn/score/very_happy" in addresses and "/mcihn/score/a_b" in addresses


def test_lsl_without_pylsl_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pylsl", None)  # makes `import pylsl` fail
    with pytest.raises(SinkError, match=r"pip install 'mcihn-live\[lsl\]'"):
        LslSink().open()


# liblsl discovery on this machine only (queries to 127.0.0.1, no IPv6), and only warnings on stderr. liblsl still
# binds its data (TCP) and time (UDP) ports on all interfaces: no setting restricts those.
LSL_LOCAL_CONFIG = """
[ports]
IPv6 = disable
[multicast]
ResolveScope = machine
ListenAddress = 127.0.0.1
[log]
level = -1
"""


@pytest.mark.parametrize("head", HEADS)
def test_lsl_outlets_stream_the_events(head):
    try:
        import pylsl
    except (ImportError, OSError, RuntimeError) as err:  # no package, or no liblsl binary for this platform
        pytest.skip(f"pylsl unavailable (pip install 'mcihn-live[lsl]'): {err}")
    try:
        pylsl.set_config_content(LSL_LOCAL_CONFIG)  # only effective before liblsl's first use in this process
    except Exception:  # an old liblsl without it: its defaults resolve on loopback too
        pass
    name = f"mcihn-test-{head}-{time.monotonic_ns()}"
    sink = LslSink(name=name, rate_hz=4.0).open()
    events = [make_event(seq, head) for seq in range(6)]
    sink.send(events[0])  # the first event creates the outlets (channels from its scores)
    found = pylsl.resolve_byprop("name", name, 1, 5.0)
    found_markers = pylsl.resolve_byprop("name", f"{name}-events", 1, 5.0)
    if not found or not found_markers:
        sink.close()
        pytest.skip("no LSL stream resolved on this machine within 5 s (multicast on loopback unavailable?)")
    inlet = pylsl.StreamInlet(found[0])
    markers = pylsl.StreamInlet(found_markers[0])
    info = inlet.info(timeout=5.0)
    assert info.channel_count() == len(events[0].scores) + 4
    assert info.nominal_srate() == 4.0
    channel, labels = info.desc().child("channels").child("channel"), []
    while not channel.empty():
        labels.append(channel.child_value("label"))
        channel = channel.next_sibling()
    assert labels == [*events[0].scores, "face", "voiced", "text", "capture_to_emit"]
    inlet.open_stream(timeout=5.0)
    markers.open_stream(timeout=5.0)
    for event in events[1:]:
        sink.send(event)
    for event in events[1:]:
        sample, stamp = inlet.pull_sample(timeout=5.0)
        assert sample == pytest.approx(sink.sample(event), abs=1e-5)
        marker, marker_stamp = markers.pull_sample(timeout=5.0)
        assert marker == [event.to_json()] and marker_stamp == pytest.approx(stamp)
    del inlet, markers
    sink.close()
