"""Faults are events (docs/live.md, "Faults"): what went wrong during a session, said once, everywhere.

- Faults: the session's record. A fault is reported once: a log line, `Recognizer.faults`, and the `faults` of the
  next event, so every output carries it. An error that ends the session (a file that broke or stopped advancing,
  a failed update) is kept in `error`, raised to an iterating host and printed by the CLI.
- SourceWatch: checked at every tick: a capture source that failed is reported once (its modality then ages out
  of the windows, hence absent), a camera is retried every 2 s, and a file source that broke or stopped advancing
  ends the session.
"""

from __future__ import annotations

import logging
import threading
import time

from realtime.buffers import AudioRing, LatestFrame

log = logging.getLogger("mcihn.live")

FILE_STALL_S = 5.0  # a file source that delivers nothing for this long (wall time) has stopped advancing
CAMERA_RETRY_S = 2.0


class Faults:
    """The faults met during a session (`lines`, one per fault), those no event has carried yet, and the error that
    ended it. Thread-safe: sources, workers and the tick all report here."""

    def __init__(self, ended: threading.Event):
        self.lines: list[str] = []
        self.error: str | None = None
        self._new: list[str] = []  # not yet carried by an event
        self._lock = threading.Lock()
        self._ended = ended

    def report(self, line: str, log_it: bool = True) -> None:
        """Report a fault once: in `lines`, in the next event's `faults`, and on the log."""
        with self._lock:
            self.lines.append(line)
            self._new.append(line)
        if log_it:
            log.warning(line)

    def take_new(self) -> list[str]:
        """The faults not carried by an event yet (the next event carries them)."""
        with self._lock:
            new, self._new = self._new, []
        return new

    def end_with_error(self, line: str) -> None:
        """The session cannot go on (a file that broke or stopped advancing): report it and end."""
        if self.error is None:
            self.error = line
            self.report(line, log_it=False)  # the session's error: said once, by whoever ran it (CLI, host)
        self._ended.set()

    def asr_failed(self, err: BaseException) -> None:
        """The ASR worker stopped (on its thread, or stepped offline): text goes absent, the session goes on."""
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        self.report(f"speech recognition stopped ({reason}); going on without text")


class SourceWatch:
    """The capture sources' health, checked at every tick. `sources` is the recognizer's own list (a camera that
    comes back replaces the failed one in it); `file` the file source replayed at a positive speed, if any."""

    def __init__(self, sources: list, faults: Faults, frames: LatestFrame, ring: AudioRing, config,
                 stop: threading.Event, file=None):
        self.sources, self.faults, self.frames, self.ring = sources, faults, frames, ring
        self.config, self.file = config, file
        self._stop = stop
        self._reported: set[int] = set()  # sources whose error was reported
        self._progress = (None, 0.0)  # (newest input time of a file source, wall time it was first seen)

    def check(self) -> None:
        """Faults of the capture sources, each reported once (their modality then goes stale, hence absent); a
        camera is retried; a file source that broke or stopped advancing ends the session with its error."""
        for source in list(self.sources):
            if source.error is None or id(source) in self._reported:
                continue
            self._reported.add(id(source))
            if source is self.file:
                self.faults.end_with_error(f"{source.error}; the replay ended early")
            elif getattr(source, "kind", "") == "camera":
                self.faults.report(f"{source.error}; going on without vision, retrying the camera every 2 s")
                threading.Thread(target=self._retry_camera, args=(source,), name="mcihn-camera-retry",
                                 daemon=True).start()
            else:
                self.faults.report(f"{source.error}; going on without audio and speech")
        if self.file is not None and not self.file.finished and self.faults.error is None:
            self._check_file_advances()

    def _check_file_advances(self) -> None:
        """A file that opened but stopped delivering (corrupt part-way) would freeze media time for ever at live
        pace: after FILE_STALL_S of wall time without a newer frame or sample, the session ends with its error."""
        newest = max(t for t in (self.ring.t_end, self.frames.t_newest, -1.0) if t is not None)
        seen, since = self._progress
        if newest != seen:
            self._progress = (newest, time.monotonic())
        elif time.monotonic() - since > FILE_STALL_S:
            at = self.file.media_time(newest) if newest >= 0 else 0.0
            self.faults.end_with_error(f"{self.config.source} stopped advancing at {at:.1f} s of media time "
                                       f"(corrupt or truncated?); the replay ended early")

    def _retry_camera(self, failed) -> None:
        from realtime.sources import CameraSource, SourceError

        cfg = self.config
        while not self._stop.wait(CAMERA_RETRY_S):
            try:
                camera = CameraSource(cfg.camera, cfg.width, cfg.height, cfg.fps, self.frames).start()
            except SourceError:
                continue
            self.sources[self.sources.index(failed)] = camera
            self.faults.report(f"{camera.name} is back; vision resumes")
            return
