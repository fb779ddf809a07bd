"""The emitter: each event to every sink and to the host's queue, without ever making the tick wait.

The sinks (JSONL, WebSocket, OSC, LSL, the `--record` folder's events.jsonl, the host's callbacks; realtime/sinks.py)
each run on their own thread behind a bounded queue, so a slow consumer never stalls a tick. The host's queue (what
`for event in rec` reads) is bounded too: when nobody reads it (callbacks or sinks only), the oldest event makes
room for the newest and is counted in `dropped`.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from pathlib import Path

from realtime.events import EmotionEvent


def build_sinks(config, labels: list[str], callbacks: list[Callable[[EmotionEvent], None]]) -> list:
    """The sinks the config asks for, in this order: JSONL, WebSocket, OSC, LSL (one channel per label), the
    recording's events.jsonl, then the host's callbacks."""
    from realtime.sinks import CallbackSink, JsonlSink, LslSink, OscSink, WebSocketSink, parse_host_port

    sinks = []
    if config.jsonl:
        sinks.append(JsonlSink(config.jsonl))
    if config.ws:
        host, port = parse_host_port(config.ws)
        sinks.append(WebSocketSink(port=port, host=host))
    if config.osc:
        host, port = parse_host_port(config.osc)
        sinks.append(OscSink(host, port))
    if config.lsl:
        sinks.append(LslSink(rate_hz=1.0 / config.hop_s, scores=labels))
    if config.record:
        sinks.append(JsonlSink(str(Path(config.record) / "events.jsonl")))
    sinks.extend(CallbackSink(cb) for cb in callbacks)
    return sinks


class Emitter:
    """`emit(event)`: to the sinks and the host's queue (`queue`; None in it ends iteration). `latest`: the newest
    event (the overlay and the status line show it)."""

    def __init__(self, queue_size: int):
        self.queue: queue.Queue[EmotionEvent | None] = queue.Queue(maxsize=queue_size)
        self.sinks = None  # realtime.sinks.SinkGroup, once opened
        self.latest: EmotionEvent | None = None
        self.dropped = 0  # events the host's queue dropped (nobody read them)

    def open(self, sinks: list, report: Callable[[str], None]) -> Emitter:
        """Open the sinks; a sink that fails mid-session is reported through `report` and disabled."""
        from realtime.sinks import SinkGroup

        self.sinks = SinkGroup(sinks, report=report).open()
        return self

    def emit(self, event: EmotionEvent) -> None:
        self.latest = event
        self.sinks.send(event)
        try:
            self.queue.put_nowait(event)
        except queue.Full:  # nobody iterates (callbacks or sinks only): keep the newest
            try:
                self.queue.get_nowait()
                self.dropped += 1
            except queue.Empty:
                pass
            self.queue.put_nowait(event)

    def close(self, timeout: float) -> None:
        """Flush and close the sinks (within `timeout`), then end the host's iteration."""
        if self.sinks is not None:
            self.sinks.close(timeout)
        try:
            self.queue.put_nowait(None)  # ends iteration
        except queue.Full:
            pass
