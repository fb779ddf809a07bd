"""A host program that ends without calling `Recognizer.stop()` must still end cleanly.

The recognizer's workers are daemon threads running native code (torch, onnxruntime, CTranslate2, PortAudio).
Python does not wait for daemon threads at exit: it tears the interpreter down under them, and a native thread
still inside a library then aborts the process ("terminate called without an active exception", exit 134; 4 of
6 runs of a host that slept 2 s and ended). So every started recognizer is registered here, and an `atexit`
handler stops it and waits for its threads before the interpreter goes away. `stop()` unregisters it; the
handler still waits for threads that outlive `stop()` (an ASR pass cannot be interrupted).

    lifecycle.register(rec)     # in Recognizer.start()
    lifecycle.unregister(rec)   # in Recognizer.stop()
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref

log = logging.getLogger("mcihn.live")

# How long the exit handler waits for worker threads in all (an ASR pass on a slow CPU takes a few seconds).
EXIT_JOIN_S = 30.0
THREAD_PREFIX = "mcihn-"  # every thread the recognizer, its sources, workers and sinks start is named so

_running: weakref.WeakSet = weakref.WeakSet()  # started and not stopped; a recognizer nobody holds is not kept
_lock = threading.Lock()
_hooked = False


def register(rec) -> None:
    """Stop `rec` at interpreter exit unless it was stopped before (call it when `rec` starts)."""
    global _hooked
    with _lock:
        _running.add(rec)
        if not _hooked:
            atexit.register(_at_exit)
            _hooked = True


def unregister(rec) -> None:
    """`rec` was stopped by its host: nothing to do for it at exit (call it from `stop()`)."""
    with _lock:
        _running.discard(rec)


def running() -> list:
    """The registered recognizers not stopped yet."""
    with _lock:
        return list(_running)


def worker_threads() -> list[threading.Thread]:
    """The recognizers' threads still alive (they are daemons: Python would not wait for them at exit)."""
    return [t for t in threading.enumerate()
            if t.name.startswith(THREAD_PREFIX) and t.is_alive() and t is not threading.current_thread()]


def _at_exit(timeout: float = EXIT_JOIN_S) -> None:
    for rec in running():
        try:
            rec.stop()
        except Exception as err:  # noqa: BLE001 - at exit: report, and still stop the others
            log.warning("stopping the recognizer at exit failed: %s", err)
        unregister(rec)
    deadline = time.monotonic() + timeout
    for thread in worker_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    left = worker_threads()
    if left:
        log.warning("%d worker thread(s) still running at exit (%s); the process may abort",
                    len(left), ", ".join(t.name for t in left))
