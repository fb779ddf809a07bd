"""Outputs: every sink receives each EmotionEvent from the tick thread (docs/events.md).

The rule every sink keeps: `send()` returns quickly whatever the consumer does. Work that can wait on a consumer
(a WebSocket client, a user callback) runs on the sink's own thread behind a bounded queue that drops the oldest
event (and counts it); work that cannot (a line to a file, a UDP datagram, an LSL push) is done inline.
`close(timeout)` flushes what is queued, then joins the sink's thread, within `timeout` seconds.

    sinks = SinkGroup([JsonlSink("run.jsonl"), WebSocketSink(port=8765), CallbackSink(print)]).open()
    sinks.send(event)          # on the tick thread, every tick
    sinks.close(timeout=1.5)   # on shutdown (Ctrl+C): flushed, no thread left behind
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import math
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from realtime.events import SCHEMA_NAME, SCHEMA_VERSION, EmotionEvent

Report = Callable[[str], None]
S = TypeVar("S", bound="Sink")


def report_stderr(line: str) -> None:
    print(f"mcihn-live: {line}", file=sys.stderr, flush=True)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class SinkError(RuntimeError):
    """An expected fault when opening an output (port in use, unwritable file, missing extra): one clear line."""


class AddressError(SinkError, ValueError):
    """A --ws / --osc address that cannot be used as given (a user's input, not a bug)."""


def parse_host_port(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """"HOST:PORT", "[IPv6]:PORT" or "PORT" -> (host, port); a bare port (or ":PORT") means `default_host`."""
    spec = text.strip()
    host, sep, port_text = spec.rpartition(":")
    if not sep:
        host, port_text = "", spec
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise AddressError(f"bad address {text!r}: put an IPv6 host in brackets, e.g. [::1]:8765")
    try:
        port = int(port_text)
    except ValueError:
        raise AddressError(f"bad address {text!r}: expected HOST:PORT or PORT, e.g. 127.0.0.1:8765 or 8765") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"bad address {text!r}: the port must be in 0..65535")
    return host or default_host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Sink:
    """One output. `send` is called on the tick thread and must never block it for long."""

    def __init__(self) -> None:
        self.sent = 0  # events accepted by send()
        self.dropped = 0  # events lost to a slow consumer (or a full socket buffer)

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def destination(self) -> str:
        """Where the events go, for a line that says they were lost ("events could not be sent to ...")."""
        return self.name

    lost_verb = "sent to"

    def open(self) -> Sink:
        return self

    def send(self, event: EmotionEvent) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 1.0) -> None:
        """Flush, release resources and join any thread, within `timeout` seconds. Calling it twice is harmless."""

    def __enter__(self) -> Sink:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlSink(Sink):
    """One JSON object per line, handed to the OS after every event so a crash loses nothing already emitted.

    The file is appended to (a rerun never destroys a recording); each session starts again at seq 0. A write
    that fails (a full disk: OSError ENOSPC) raises, and a line it wrote in part is cut off again, so the file
    always ends with a whole event (SinkGroup then reports the fault and counts the events lost).
    """

    lost_verb = "written to"

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self._file: IO[bytes] | None = None
        self._size: int | None = None  # bytes of whole events in the file (None: not seekable, a pipe)

    @property
    def name(self) -> str:
        return f"JSONL {self.path}"

    @property
    def destination(self) -> str:
        return str(self.path)

    def open(self) -> JsonlSink:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab", buffering=0)  # unbuffered: every write goes to the OS at once
        except OSError as err:
            raise SinkError(f"cannot write events to {self.path}: {err.strerror or err}; "
                            "pick a writable file for --jsonl") from None
        self._size = self._file.seek(0, os.SEEK_END) if self._file.seekable() else None
        return self

    def send(self, event: EmotionEvent) -> None:
        if self._file is None:
            return
        data = memoryview((event.to_json() + "\n").encode("utf-8"))
        written = 0
        try:
            while written < len(data):
                n = self._file.write(data[written:])
                if not n:  # a non-blocking pipe that is full: never spin on the tick thread
                    raise OSError(errno.EAGAIN, "the file took no bytes")
                written += n
        except OSError:
            if written and self._size is not None:
                with contextlib.suppress(OSError):  # cut the partial line: the file ends with a whole event
                    os.ftruncate(self._file.fileno(), self._size)
            raise
        if self._size is not None:
            self._size += written
        self.sent += 1

    def close(self, timeout: float = 1.0) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()


@dataclass(eq=False)
class _WsClient:
    ws: Any  # websockets.asyncio.server.ServerConnection
    queue: deque[str]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    busy: bool = False  # a message is being written to this client
    dropped: int = 0


class WebSocketSink(Sink):
    """A WebSocket server broadcasting each event's JSON (one text message per event) to every connected client.

    The server's asyncio loop runs in its own thread; `send` only hands the JSON to that loop. Each client has a
    bounded queue: a client that reads too slowly (or not at all) loses its oldest events, counted in
    `dropped`, and never delays the recognizer or the other clients. Clients that connect later get the events
    from then on. `port=0` picks a free port, readable in `port` after `open()`. Any host may be given, but the
    default is loopback: a non-loopback host is reachable from other machines, without authentication.
    """

    def __init__(self, port: int = 8765, host: str = "127.0.0.1", queue_size: int = 64, close_timeout: float = 0.5,
                 report: Report = report_stderr):
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.host, self.port = host, port
        self.queue_size = queue_size
        self.close_timeout = close_timeout  # per-connection closing handshake; a dead client is then aborted
        self._report = report
        self._clients: set[_WsClient] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._open_error: SinkError | None = None
        self._deadline = 0.0  # time.monotonic() by which close() must have finished

    @property
    def name(self) -> str:
        return f"WebSocket {self.url}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def clients(self) -> int:
        return len(self._clients)

    def open(self, timeout: float = 10.0) -> WebSocketSink:
        self._thread = threading.Thread(target=self._run, name="mcihn-ws", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.close()
            raise SinkError(f"the WebSocket server on {self.host}:{self.port} did not start within {timeout:.0f} s")
        if self._open_error is not None:
            self._thread.join()
            self._thread = None
            raise self._open_error
        if not is_loopback(self.host):
            self._report(f"WebSocket events on {self.url} are reachable from other machines (no authentication)")
        return self

    def send(self, event: EmotionEvent) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        data = event.to_json()  # serialized here, once, whatever the number of clients
        try:
            loop.call_soon_threadsafe(self._fan_out, data)  # never blocks: a wake-up byte on the loop's pipe
        except RuntimeError:  # the loop is closing: this event goes nowhere
            return
        self.sent += 1

    def close(self, timeout: float = 1.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._deadline = time.monotonic() + timeout
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            self._report(f"the WebSocket server thread did not stop within {timeout:.1f} s; left behind")

    # Everything below runs on the sink's own thread, in its event loop.

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as err:  # a bug, not an expected fault: say so instead of dying silently
            if not self._ready.is_set():
                self._open_error = SinkError(f"the WebSocket server failed to start: {_one_line(err)}")
                self._ready.set()
            else:
                self._report(f"the WebSocket server stopped: {_one_line(err)}")

    async def _serve(self) -> None:
        from websockets.asyncio.server import serve

        self._stop = asyncio.Event()
        try:
            # No compression: it would cost CPU per client per event on a thread that shares the GIL with the tick.
            server = await serve(self._handle, self.host, self.port, compression=None, max_size=2**16,
                                 close_timeout=self.close_timeout)
        except OSError as err:
            hint = ("another program (another mcihn-live?) listens there; pick another port"
                    if err.errno == errno.EADDRINUSE else "check the host and port")
            reason = "address already in use" if err.errno == errno.EADDRINUSE else (err.strerror or str(err))
            self._open_error = SinkError(f"cannot serve WebSocket events on {self.host}:{self.port}: {reason}; {hint}")
            self._ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        await self._stop.wait()
        # Flush: give the clients part of the remaining time to receive what is queued; then close every
        # connection, and abort those that could not even take the close frame (a stalled or dead client).
        budget = max(0.0, self._deadline - time.monotonic())
        flush_until = time.monotonic() + budget * 0.4
        while time.monotonic() < flush_until and any(c.queue or c.busy for c in self._clients):
            await asyncio.sleep(0.01)
        server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(server.wait_closed()), budget * 0.3)
        for client in list(self._clients):
            client.ws.transport.abort()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), max(0.01, self._deadline - time.monotonic() - 0.05))

    def _fan_out(self, data: str) -> None:
        for client in self._clients:
            if len(client.queue) == self.queue_size:  # the deque drops the oldest on append; count it
                client.dropped += 1
                self.dropped += 1
            client.queue.append(data)
            client.wake.set()

    async def _handle(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        client = _WsClient(ws, deque(maxlen=self.queue_size))
        self._clients.add(client)
        pump = asyncio.create_task(self._pump(client))
        try:
            async for _ in ws:  # incoming messages are ignored, but reading keeps pings and close frames flowing
                pass
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await pump

    @staticmethod
    async def _pump(client: _WsClient) -> None:
        while True:
            await client.wake.wait()
            client.wake.clear()
            while client.queue:
                data = client.queue.popleft()
                client.busy = True
                await client.ws.send(data)  # waits while this client's socket is full; only this client waits
                client.busy = False


def _osc_name(label: str) -> str:
    """A score label as one OSC address part: characters OSC reserves (space # * , / ? [ ] { }) become '_'."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", label) or "_"


class OscSink(Sink):
    """Open Sound Control over UDP (python-osc). Per event, in this order (docs/events.md, "OSC"):

    /mcihn/seq int, /mcihn/score/<label> float (one per score), /mcihn/presence int int int (face, voiced, text),
    /mcihn/latency float (capture_to_emit, ms), /mcihn/event string (the event's JSON, as on every other output).
    UDP never waits for the receiver: when the socket buffer is full the rest of the event is dropped and counted.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9000, prefix: str = "/mcihn"):
        super().__init__()
        if not 1 <= port <= 65535:
            raise AddressError(f"the OSC port must be in 1..65535, got {port}")
        self.host, self.port = host, port
        self.prefix = "/" + prefix.strip("/")
        self._client: Any = None  # pythonosc.udp_client.SimpleUDPClient

    @property
    def name(self) -> str:
        return f"OSC {self.host}:{self.port}"

    def open(self) -> OscSink:
        from pythonosc.udp_client import SimpleUDPClient

        try:
            self._client = SimpleUDPClient(self.host, self.port)  # non-blocking socket
        except OSError as err:
            raise SinkError(f"cannot send OSC to {self.host}:{self.port}: {err.strerror or err}") from None
        return self

    def messages(self, event: EmotionEvent) -> list[tuple[str, Any]]:
        p, presence = self.prefix, event.presence
        flags = [int(presence.vision.present), int(presence.audio.voiced), int(presence.text.present)]
        return [
            (f"{p}/seq", event.seq),
            *((f"{p}/score/{_osc_name(label)}", float(value)) for label, value in event.scores.items()),
            (f"{p}/presence", flags),
            (f"{p}/latency", float(event.latency_ms["capture_to_emit"])),
            (f"{p}/event", event.to_json()),
        ]

    def send(self, event: EmotionEvent) -> None:
        if self._client is None:
            return
        try:
            for address, value in self.messages(event):
                self._client.send_message(address, value)
        except BlockingIOError:  # the socket buffer is full: drop, never wait
            self.dropped += 1
            return
        except OSError as err:
            if err.errno != errno.EMSGSIZE:  # an event larger than a datagram (a very long text) is dropped
                raise
            self.dropped += 1
            return
        self.sent += 1

    def close(self, timeout: float = 1.0) -> None:
        client, self._client = self._client, None
        if client is not None:
            # SimpleUDPClient.close() only exists in recent python-osc releases.
            (getattr(client, "close", None) or client._sock.close)()


LSL_PRESENCE_CHANNELS = ("face", "voiced", "text")
LSL_LATENCY_CHANNEL = "capture_to_emit"


def _import_pylsl() -> Any:
    try:
        import pylsl
    except (ImportError, OSError, RuntimeError) as err:  # no package, or no liblsl for this platform
        raise SinkError(f"the LSL output needs pylsl: pip install 'mcihn-live[lsl]' ({_one_line(err)})") from None
    return pylsl


class LslSink(Sink):
    """Lab Streaming Layer outlets (pylsl, the `lsl` extra): numbers for analysis, and the full event as a marker.

    Outlet `name` (type "Emotion", float32): one channel per score, then face, voiced, text (0/1), then
    capture_to_emit (ms); labels, types and units are in the stream description. Outlet `name + "-events"`
    (type "Markers", one string channel): the event JSON. Samples are stamped with the capture time of the newest
    input used, on the LSL clock. `rate_hz` is the nominal rate (the tick rate; 0 = irregular). Without
    `scores`, the score channels are those of the first event. pushes never wait for consumers (liblsl buffers).
    """

    def __init__(self, name: str = "mcihn-live", rate_hz: float = 0.0, scores: Sequence[str] | None = None,
                 source_id: str | None = None):
        super().__init__()
        self.stream_name = name
        self.rate_hz = rate_hz
        self.scores = list(scores) if scores is not None else None
        self.source_id = source_id or name  # a stable id lets LSL inlets reconnect after a restart
        self._pylsl: Any = None
        self._outlet: Any = None
        self._markers: Any = None

    @property
    def name(self) -> str:
        return f"LSL {self.stream_name}"

    @property
    def channels(self) -> list[str]:
        return [*(self.scores or []), *LSL_PRESENCE_CHANNELS, LSL_LATENCY_CHANNEL]

    def open(self) -> LslSink:
        self._pylsl = _import_pylsl()
        if self.scores is not None:
            self._make_outlets()
        return self

    def _make_outlets(self) -> None:
        lsl = self._pylsl
        info = lsl.StreamInfo(self.stream_name, "Emotion", len(self.channels), self.rate_hz, "float32",
                              f"{self.source_id}-scores")
        desc = info.desc()
        desc.append_child_value("schema", SCHEMA_NAME)
        desc.append_child_value("version", str(SCHEMA_VERSION))
        channels = desc.append_child("channels")
        kinds = [("score", "")] * len(self.scores or []) + [("presence", "bool")] * 3 + [("latency", "ms")]
        for label, (kind, unit) in zip(self.channels, kinds, strict=True):
            channel = channels.append_child("channel")
            channel.append_child_value("label", label)
            channel.append_child_value("type", kind)
            channel.append_child_value("unit", unit)
        self._outlet = lsl.StreamOutlet(info)
        markers = lsl.StreamInfo(f"{self.stream_name}-events", "Markers", 1, lsl.IRREGULAR_RATE, "string",
                                 f"{self.source_id}-events")
        markers.desc().append_child_value("schema", SCHEMA_NAME)
        markers.desc().append_child_value("version", str(SCHEMA_VERSION))
        self._markers = lsl.StreamOutlet(markers)

    def sample(self, event: EmotionEvent) -> list[float]:
        """The numeric sample: scores in channel order (NaN for a label this event lacks), flags, latency."""
        p = event.presence
        scores = [float(event.scores.get(label, math.nan)) for label in self.scores or []]
        flags = [float(p.vision.present), float(p.audio.voiced), float(p.text.present)]
        return [*scores, *flags, float(event.latency_ms["capture_to_emit"])]

    def send(self, event: EmotionEvent) -> None:
        if self._pylsl is None:
            return
        if self._outlet is None:
            self.scores = list(event.scores)
            self._make_outlets()
        # The capture time of the newest input, mapped from time.monotonic() onto the LSL clock.
        age_s = time.monotonic() - event.t_mono + event.latency_ms["capture_to_emit"] / 1000
        stamp = self._pylsl.local_clock() - age_s
        self._outlet.push_sample(self.sample(event), stamp)
        self._markers.push_sample([event.to_json()], stamp)
        self.sent += 1

    def close(self, timeout: float = 1.0) -> None:
        # Dropping the outlets destroys them (liblsl joins its own IO threads; they are not Python threads).
        self._outlet = self._markers = None
        self._pylsl = None


class CallbackSink(Sink):
    """Calls `fn(event)` for every event, on its own thread, so a slow callback never stalls the recognizer.

    Events wait in a bounded queue (oldest dropped and counted when full). An exception in the callback is
    reported once (one line), counted in `errors`, and the next events are still delivered.
    """

    def __init__(self, fn: Callable[[EmotionEvent], Any], queue_size: int = 256, report: Report = report_stderr):
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.fn = fn
        self.queue_size = queue_size
        self.errors = 0
        self._report = report
        self._queue: deque[EmotionEvent] = deque(maxlen=queue_size)
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"callback {getattr(self.fn, '__qualname__', repr(self.fn))}"

    def open(self) -> CallbackSink:
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mcihn-callback", daemon=True)
        self._thread.start()
        return self

    def send(self, event: EmotionEvent) -> None:
        with self._cond:
            if self._thread is None or self._closing:
                return
            if len(self._queue) == self.queue_size:
                self.dropped += 1
            self._queue.append(event)
            self.sent += 1
            self._cond.notify()

    def close(self, timeout: float = 1.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._cond:
            self._closing = True  # the worker delivers what is queued, then exits
            self._cond.notify()
        thread.join(timeout)
        if thread.is_alive():
            with self._cond:
                self.dropped += len(self._queue)
                self._queue.clear()  # so the worker exits as soon as the running call returns
            self._report(f"{self.name} still running after {timeout:.1f} s; its thread is left behind")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                event = self._queue.popleft()
            try:
                self.fn(event)
            except Exception as err:  # the user's code: report once, keep delivering
                self.errors += 1
                if self.errors == 1:
                    self._report(f"{self.name} raised {_one_line(err)} (event {event.seq}); further errors from "
                                 "it are counted, not shown; the recognizer goes on")


@dataclass(eq=False)
class SinkFailure:
    """A sink that failed and was disabled, and how many events it did not get (the one it failed on, and every
    event after it)."""

    sink: Sink
    error: BaseException
    lost: int = 1

    @property
    def reason(self) -> str:
        strerror = getattr(self.error, "strerror", None)
        return strerror if isinstance(self.error, OSError) and strerror else _one_line(self.error)

    def line(self) -> str:
        """"events could not be written to FILE (No space left on device); 12 events lost"."""
        return (f"events could not be {self.sink.lost_verb} {self.sink.destination} ({self.reason}); "
                f"{self.lost} event{'' if self.lost == 1 else 's'} lost")


class SinkGroup(Sink):
    """Fan-out: sends each event to every sink. A sink that raises is reported once and disabled; the others go on.
    What the disabled sinks lost is in `failures` (lost data: a command exits non-zero).

    `open()` fails with the first sink that cannot open (closing those already open). `close(timeout)` closes
    every sink within `timeout` seconds in total: each gets an equal share of what is left.
    """

    def __init__(self, sinks: Iterable[Sink] = (), report: Report = report_stderr):
        self.sent = 0  # no super().__init__(): the group's `dropped` is the sum over its sinks
        self.sinks: list[Sink] = list(sinks)
        self.failed: dict[str, str] = {}  # sink name -> the error that disabled it
        self.failures: list[SinkFailure] = []  # the same sinks, with the events each one lost
        self._report = report
        self._active: list[Sink] = []
        self._lock = threading.Lock()  # send (tick thread) vs close (main thread)

    def add(self, sink: Sink) -> Sink:
        self.sinks.append(sink)
        return sink

    def find(self, kind: type[S]) -> S | None:
        """The first sink of type `kind` (say WebSocketSink, to read the port it serves on), or None."""
        return next((sink for sink in self.sinks if isinstance(sink, kind)), None)

    def open(self) -> SinkGroup:
        opened: list[Sink] = []
        try:
            for sink in self.sinks:
                sink.open()
                opened.append(sink)
        except BaseException:
            for sink in reversed(opened):
                with contextlib.suppress(Exception):
                    sink.close(0.5)
            raise
        self._active = opened
        return self

    def send(self, event: EmotionEvent) -> None:
        with self._lock:
            for failure in self.failures:  # a disabled sink loses this event
                failure.lost += 1
            for sink in list(self._active):
                try:
                    sink.send(event)
                except Exception as err:
                    self._disable(sink, err)
            self.sent += 1

    def _disable(self, sink: Sink, err: Exception) -> None:
        self._active.remove(sink)
        self.failed[sink.name] = _one_line(err)
        self.failures.append(SinkFailure(sink, err))
        self._report(f"output {sink.name} failed and is disabled: {_one_line(err)}")
        with contextlib.suppress(Exception):
            sink.close(0.1)

    def close(self, timeout: float = 1.5) -> None:
        with self._lock:
            sinks, self._active = self._active, []
        deadline = time.monotonic() + timeout
        for i, sink in enumerate(sinks):
            share = max(0.0, deadline - time.monotonic()) / (len(sinks) - i)
            try:
                sink.close(share)
            except Exception as err:
                self._report(f"closing output {sink.name} failed: {_one_line(err)}")

    @property
    def dropped(self) -> int:  # type: ignore[override]
        return sum(sink.dropped for sink in self.sinks)

    def stats(self) -> dict[str, dict[str, int]]:
        return {sink.name: {"sent": sink.sent, "dropped": sink.dropped} for sink in self.sinks}
