"""Free heap memory handed back to the system during long sessions (glibc's malloc_trim).

glibc's malloc keeps memory that a thread freed in that thread's arena, for reuse, and gives it back to the
system only from the top of the main heap. In a session whose threads allocate blocks of changing sizes (Whisper
buffers and encoder inputs of 10-20 s, decoder outputs, text tokens), the resident size then rises in steps to new
high-water marks and never comes down. Measured (docs/benchmarks.md, "Soak"): a 30-minute soak's RSS floor rose
+15 MB in its first 5 minutes and +27 MB in one step at 751 s. At the end of a 10-minute soak, malloc_trim(0)
returned 136 MB, more than all the growth since the first minute: free memory malloc kept, not live objects.

So a session calls malloc_trim(0) every `interval_s` (60 s by default, `LiveConfig.trim_memory_s`) from a thread
of its own. It runs at normal priority: it takes each arena's lock while trimming it, and a low-priority thread
preempted while holding one would stall the tick's allocations behind it.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import resource
import sys
import threading
import time

M_ARENA_MAX = -8  # mallopt's parameter number for the arena limit (glibc's malloc.h)


@functools.cache
def _glibc(name: str):
    """A glibc malloc function, loaded once; None where there is no glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def resident_mb(part: str = "total") -> float:
    """Resident memory of this process now, MB: "total", or its "anon" part (heaps and anonymous mappings: what
    malloc holds) or "file" part (mapped files: the libraries' code and data, paged in as code paths first run,
    and dropped by the kernel under memory pressure). Linux /proc; the peak from getrusage elsewhere."""
    try:
        if part == "total":
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        key = {"anon": "RssAnon:", "file": "RssFile:"}[part]
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024  # kB
    except (OSError, StopIteration):
        return peak_resident_mb()


def peak_resident_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def release_free_memory() -> bool:
    """glibc's malloc_trim(0): the free memory of every malloc arena goes back to the system. False where there is
    no glibc."""
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def limit_malloc_arenas(arenas: int) -> bool:
    """At most `arenas` malloc arenas in this process from now on (glibc's mallopt(M_ARENA_MAX)): threads that
    allocate for the first time afterwards share the existing ones. False where there is no glibc.

    glibc gives threads up to 8 arenas per core, each a heap of its own whose free memory stays with it. And
    malloc_trim(0) cannot return the free top of any arena but the main one: a thread arena's heap stays resident
    up to the highest it ever reached, and rises in steps each time a larger transient (a longer ASR buffer) than
    any before comes (measured: docs/benchmarks.md, "Soak: one arena"; tests/test_headroom.py shows the
    mechanism). With one arena (the session's default) every thread allocates from the main one and the periodic
    trim reaches all the free memory. Call it before the process starts any thread: glibc hands the arena of an
    exited thread to the next new one whatever the limit (`mcihn bench` calls it first thing; a host program that
    started threads before `Recognizer.start()` sets MALLOC_ARENA_MAX=1 in its environment instead). Process-wide:
    a host program that must keep glibc's default sets `LiveConfig.malloc_arenas=0`."""
    mallopt = _glibc("mallopt")
    if mallopt is None or arenas < 1:
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


def malloc_arenas_mb() -> list[float]:
    """The MB each of glibc's malloc arenas holds from the system now (malloc_info's per-heap "system current";
    the main arena first); [] where there is no glibc. More than one entry: threads allocate outside the main
    arena, whose free tops the trim cannot return (see limit_malloc_arenas)."""
    import tempfile
    import xml.etree.ElementTree as ElementTree

    info, fopen, fclose = _glibc("malloc_info"), _glibc("fopen"), _glibc("fclose")
    if info is None or fopen is None or fclose is None:
        return []
    fopen.restype = ctypes.c_void_p
    info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        stream = fopen(f.name.encode(), b"w")
        if not stream:
            return []
        info(0, stream)
        fclose(stream)
        root = ElementTree.parse(f.name).getroot()
    return [int(heap.find("system[@type='current']").get("size")) / 2**20 for heap in root.findall("heap")]


class MemoryTrimmer:
    """Calls `release_free_memory` every `interval_s` until stopped; `trims` and `last_ms` say what it did.

    When it is due, a trim waits up to `quiet_wait_s` for `mark_quiet()`, which the ASR worker calls after each
    pass: an ASR pass's buffers (mel features, encoder input and output of a 10-20 s window) swing the RSS by
    tens of MB, and a trim in the middle of a pass can hand back none of them. Without speech no pass runs and
    the trim goes ahead when the wait ends.

    `after_trim` holds (time.monotonic(), resident MB, its anonymous part) read right after each trim, the last
    day's at 60 s: the memory the process cannot give back (live data, and free blocks pinned below live ones).
    Its trend is the session's real growth; RSS sampled at other moments also holds whatever malloc kept since
    the last trim. `arenas_after_trim` holds `malloc_arenas_mb()` at the same moments: with more than one arena,
    a thread arena whose size only ever rises is memory the trim cannot reach.
    """

    def __init__(self, interval_s: float = 60.0, quiet_wait_s: float = 5.0):
        if interval_s <= 0:
            raise ValueError(f"the trim interval must be positive, got {interval_s} s")
        self.interval_s = interval_s
        self.quiet_wait_s = quiet_wait_s
        self.trims = 0
        self.quiet_trims = 0  # trims that ran right after a mark_quiet(), not at the end of the wait
        self.last_ms: float | None = None
        self.after_trim: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=1440)
        self.arenas_after_trim: collections.deque[list[float]] = collections.deque(maxlen=1440)
        self._quiet = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mcihn-memory", daemon=True)

    def start(self) -> MemoryTrimmer:
        self._thread.start()
        return self

    def mark_quiet(self) -> None:
        """A moment when the big transient buffers are free (an ASR pass just ended): a due trim runs now."""
        self._quiet.set()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._quiet.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._quiet.clear()
            quiet = self._quiet.wait(self.quiet_wait_s)
            if self._stop.is_set():
                return
            start = time.perf_counter()
            if not release_free_memory():
                return  # no glibc: nothing to do, ever
            self.last_ms = (time.perf_counter() - start) * 1e3
            self.after_trim.append((time.monotonic(), resident_mb(), resident_mb("anon")))
            self.arenas_after_trim.append(malloc_arenas_mb())
            self.trims += 1
            self.quiet_trims += quiet
