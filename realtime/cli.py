"""`mcihn-live`: live emotion scores over the video, streamed to any output. A thin shell over Recognizer."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback

EXAMPLES = """examples:
  mcihn-live                                         # the starter recognizer: camera 0 + default microphone
  mcihn-live --demo                                  # the starter on the bundled clip (no camera, mic or network)
  mcihn-live --checkpoint runs/meld-mcihn            # a checkpoint written by `mcihn train` (MCIHN or MCN-CL fuses)
  mcihn-live --checkpoint C --camera 1 --mic USB --ws 8765 --jsonl events.jsonl
  mcihn-live --checkpoint C --source interview.mp4 --osc 127.0.0.1:9000 --no-overlay
  mcihn-live --checkpoint C --record session1        # later: --source session1 replays it
  mcihn-live --list-devices
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcihn-live", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a checkpoint folder written by `mcihn train` (or its run folder); "
                                        "default: the starter recognizer (real face, speech and text models)")
    p.add_argument("--demo", action="store_true", help="replay the bundled clip (offline; no camera or microphone)")
    p.add_argument("--standins", choices=("tiny", "base"),
                   help="random stand-in models instead (untrained: scores mean nothing; for tests and timing)")
    p.add_argument("--list-devices", action="store_true", help="list cameras and microphones, then exit")
    src = p.add_argument_group("sources")
    src.add_argument("--source", default=None,
                     help="devices (camera + microphone; the default), or a video file / --record folder "
                          "(--demo: the bundled clip)")
    src.add_argument("--camera", default="0", help="camera index, video path or stream URL (default 0)")
    src.add_argument("--mic", default=None, help="microphone index or part of its name (default: the system's)")
    src.add_argument("--width", type=int)
    src.add_argument("--height", type=int)
    src.add_argument("--fps", type=float, help="camera frame rate to ask for")
    src.add_argument("--no-camera", action="store_true")
    src.add_argument("--no-mic", action="store_true")
    src.add_argument("--speed", type=float, default=1.0,
                     help="file source: replay speed (1 = live pace; 0 = as fast as possible, no tick skipped)")
    src.add_argument("--loop", action="store_true", help="file source: start over at the end")
    run = p.add_argument_group("processing")
    run.add_argument("--hop", type=float, default=0.25, help="seconds between updates (default 0.25: 4/s)")
    run.add_argument("--window", type=float, default=None,
                     help="seconds of audio and video per update (default: the checkpoint's recorded window, else "
                          "2.56; a checkpoint's recorded window cannot be changed)")
    run.add_argument("--text-horizon", type=float, default=None,
                     help="seconds committed words stay fused after the last one was spoken (default: the "
                          "checkpoint's, else 8)")
    run.add_argument("--backend", default="auto", help="auto | torch | onnxruntime | tensorrt")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is a GPU)")
    run.add_argument("--precision", default=None, choices=("fp32", "fp16", "int8"),
                     help="extractors: fp16 (GPU; its default), fp32 (the CPU's default) or int8 (onnxruntime on "
                          "the CPU: int8 matrix products, ~3x faster transformers)")
    run.add_argument("--incremental-audio", action="store_true",
                     help="CPU: compute only the audio window's new frames each update, not the whole window: "
                          "several times cheaper, approximate (docs/live.md, 'Incremental audio features')")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads per worker (vision, updates, ASR); default: half the cores")
    run.add_argument("--vision-model", help="load the checkpoint's vision model from this folder instead")
    run.add_argument("--text-model", help="load the checkpoint's text model from this folder instead")
    run.add_argument("--audio-model", help="load the checkpoint's audio model from this folder instead")
    run.add_argument("--server", default=None, metavar="HOST:PORT",
                     help="run the extractors and the fusion on this inference server (`mcihn serve`); capture, "
                          "windows and ASR stay here (docs/scaling.md)")
    run.add_argument("--server-timeout", type=float, default=2.0,
                     help="seconds to wait for the server's answer before its modalities count as absent (2)")
    run.add_argument("--cache-dir", default=None, help="models, ONNX files and engines (~/.cache/mcihn-live)")
    asr = p.add_argument_group("speech recognition (faster-whisper)")
    asr.add_argument("--asr-model", default="tiny.en",
                     help="tiny.en (installed; the default), or a size cached by `mcihn download --asr-model SIZE` "
                          "(base, small, ...), or a CTranslate2 folder")
    asr.add_argument("--language", default="en", help="en, zh, ... or auto")
    asr.add_argument("--asr-device", default="auto", help="auto | cpu | cuda")
    asr.add_argument("--compute-type", default="auto", help="auto (int8 on CPU, float16 on GPU), int8, float16, ...")
    asr.add_argument("--no-asr", action="store_true", help="no speech recognition (text stays absent)")
    asr.add_argument("--asr-nice", type=int, default=10, choices=range(20), metavar="0-19",
                     help="Linux: the ASR threads' niceness, so its passes never starve the updates (default 10; "
                          "0: normal priority)")
    out = p.add_argument_group("outputs")
    out.add_argument("--jsonl", help="append every event to this file, one JSON object per line")
    out.add_argument("--ws", help="broadcast events over WebSocket on [HOST:]PORT (loopback by default)")
    out.add_argument("--osc", help="send events as OSC messages to [HOST:]PORT")
    out.add_argument("--lsl", action="store_true", help="publish a Lab Streaming Layer outlet (needs mcihn-live[lsl])")
    out.add_argument("--record", help="save the session's video, audio and events in this folder")
    out.add_argument("--no-overlay", action="store_true", help="no window, even with a display")
    out.add_argument("--duration", type=float, help="stop after this many seconds")
    out.add_argument("--quiet", action="store_true", help="no per-second status line on the terminal")
    return p


def config_from_args(args):
    """The LiveConfig the arguments ask for; ConfigError (one line) when they cannot run as given."""
    from realtime.recognizer import ConfigError
    from realtime.sinks import parse_host_port

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    for address in (args.ws, args.osc):
        if address:
            parse_host_port(address)  # a bad address is said before seconds of model loading (AddressError)
    try:  # AsrOptions and LiveConfig check their values with ValueError: the user's input, not a bug
        return _config_from_args(args)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _config_from_args(args):
    from realtime.asr import AsrOptions
    from realtime.recognizer import DEFAULT_CACHE, LiveConfig

    asr = AsrOptions(model=args.asr_model, language=None if args.language == "auto" else args.language,
                     device=args.asr_device, compute_type=args.compute_type, nice=args.asr_nice)
    camera = int(args.camera) if str(args.camera).isdigit() else args.camera
    mic = int(args.mic) if args.mic is not None and str(args.mic).isdigit() else args.mic
    return LiveConfig(
        checkpoint=args.checkpoint, demo=args.demo, standins=args.standins, source=args.source, camera=camera, mic=mic,
        width=args.width,
        height=args.height, fps=args.fps, use_camera=not args.no_camera, use_mic=not args.no_mic,
        use_asr=not args.no_asr, speed=args.speed, loop=args.loop, hop_s=args.hop, window_s=args.window,
        text_horizon_s=args.text_horizon,
        backend=args.backend, device=args.device, precision=args.precision, threads=args.threads,
        incremental_audio=args.incremental_audio,
        vision_model=args.vision_model, text_model=args.text_model,
        audio_model=args.audio_model, asr=asr, jsonl=args.jsonl, ws=args.ws, osc=args.osc, lsl=args.lsl,
        record=args.record, cache_dir=args.cache_dir or str(DEFAULT_CACHE),
        server=args.server, server_timeout_s=args.server_timeout,
        limit_process_threads=True,  # the command owns its process: torch's and OpenCV's pools too
    )


def _top(scores: dict[str, float] | None, head: str = "classification") -> str:
    if not scores:
        return "-"
    label, value = max(scores.items(), key=lambda kv: kv[1])
    return f"valence {value:+.2f}" if head == "regression" else f"{label} {value:.2f}"


def _status(event, rate: float) -> str:
    p = event.presence
    flags = "".join(c if on else "-" for c, on in (("F", p.vision.present), ("V", p.audio.voiced),
                                                   ("T", p.text.present)))
    own = "  ".join(f"{name} {_top(event.modalities[m].scores)}" for m, name in (("vision", "face"), ("text", "text"))
                    if event.modalities[m].scores)
    return (f"#{event.seq:5d} t={event.t_media:7.2f}s {_top(event.scores, event.head):14s} [{flags}] "
            + (f"({own}) " if own else "")
            + f"latency {event.latency_ms['capture_to_emit']:5.0f} ms  {rate:4.1f}/s"
            + ("  UNTRAINED" if event.untrained else "")
            + (f"  \u201c{p.text.text[-40:]}\u201d" if p.text.text else ""))


def run_session(rec, overlay: bool, duration: float | None, quiet: bool) -> None:
    """Show the overlay (main thread: HighGUI wants it) or a status line until the end, q/Esc, or Ctrl+C."""
    from realtime.overlay import OverlayWindow, render

    window = OverlayWindow() if overlay else None
    start, last_status, last_seq, rate = time.monotonic(), 0.0, -1, 0.0
    shown_seq = -1  # faults met during the session are printed by the recognizer's log, once each
    try:
        while not rec.finished and (duration is None or time.monotonic() - start < duration):
            event = rec.latest_event
            now = time.monotonic()
            if event is not None and now - last_status >= 1.0:
                rate = (event.seq - last_seq) / (now - last_status) if last_seq >= 0 else 0.0
                if not quiet and event.seq != shown_seq:
                    print(_status(event, rate), file=sys.stderr, flush=True)
                    shown_seq = event.seq
                last_status, last_seq = now, event.seq
            if window is not None:
                if not window.show(render(rec.latest_frame, event, rate), wait_ms=30):
                    break
            else:
                time.sleep(0.05)
            if rec.ticker is not None and rec.ticker.error is not None:
                raise rec.ticker.error
    finally:
        if window is not None:
            window.close()


def expected_errors() -> tuple[type[BaseException], ...]:
    """The faults a user can meet (arguments, devices, files, models not cached, damaged or mismatched
    checkpoints): one `mcihn-live: error:` line and exit 2. Anything else is a bug and keeps its traceback."""
    from engines.backends import BackendUnavailableError
    from engines.face import FaceModelsMissingError
    from engines.hub import ModelNotAvailableError
    from engines.media import MediaError
    from mcihn.checkpoint import CheckpointError
    from mcihn.spec import SpecMismatchError
    from realtime.recognizer import ConfigError
    from realtime.sinks import SinkError
    from realtime.sources import SourceError

    return (ConfigError, CheckpointError, SpecMismatchError, ModelNotAvailableError, SourceError, SinkError,
            BackendUnavailableError, FaceModelsMissingError, MediaError)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 the session ended (end of the file, --duration, q/Esc, Ctrl+C or SIGTERM once running);
    1 events were lost (an output failed: a full disk) or a bug (its traceback is printed); 2 an expected fault
    (one line); 130 Ctrl+C before the recognizer was running (imports, model loading)."""
    # Until the recognizer runs, Ctrl+C (or SIGTERM) leaves at once: a KeyboardInterrupt raised while a native
    # module imports or loads (pybind11 code calling back into Python) makes C++ call terminate() (an abort,
    # seen in 1 of ~10 tries at 0.5 s). Nothing is running or written yet, so there is nothing to flush.
    signal.signal(signal.SIGINT, _leave_during_start_up)
    signal.signal(signal.SIGTERM, _leave_during_start_up)
    try:
        code = _run(build_parser().parse_args(argv))
    except KeyboardInterrupt:  # during start-up, or a second Ctrl+C while stopping: no traceback
        print("mcihn-live: stopping", file=sys.stderr)
        code = 130
    if code == 130:
        # Python 3.11 counts a Ctrl+C raised inside exec() (dataclasses and torch run exec while they import) as
        # unhandled, and at exit kills the process with SIGINT whatever main returned. Nothing runs yet (the
        # recognizer, if any, is stopped): leave now, with the exit code we mean.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return code


def _leave_during_start_up(*_) -> None:
    print("mcihn-live: stopping", file=sys.stderr, flush=True)
    os._exit(130)


def _run(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="mcihn-live: %(message)s")
    if args.list_devices:
        from realtime.sources import list_devices

        print(list_devices())
        return 0
    # SIGTERM (a supervisor, a closed terminal) shuts down like Ctrl+C: outputs flushed, threads joined.
    from realtime.overlay import display_available
    from realtime.recognizer import Recognizer

    expected = expected_errors()
    rec, code, running, bug = None, 0, False, None
    try:
        config = config_from_args(args)
        overlay = not args.no_overlay and display_available()
        if not args.no_overlay and not overlay:
            print("mcihn-live: no display found; running headless (events go to the outputs and this terminal)",
                  file=sys.stderr)
        rec = Recognizer(config)
        rec.start()
        running = True
        # From now on Ctrl+C and SIGTERM stop the session cleanly: outputs flushed, threads joined.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        _announce(rec, args)
        run_session(rec, overlay, args.duration, args.quiet)
        if rec.error is not None:  # the session ended early on an error (a broken file, a failed update)
            print(f"mcihn-live: error: {rec.error}", file=sys.stderr)
            code = 1
    except expected as err:
        print(f"mcihn-live: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("mcihn-live: stopping", file=sys.stderr)
        code = 0 if running else 130
    except Exception as err:  # a bug: stop cleanly first, then show its traceback (exit 1)
        bug = err
    if rec is not None:
        rec.stop(timeout=2.0)
        if running:
            _summary(rec)
        if _report_losses(rec):
            code = code or 1
        if rec.lingering():
            # An ASR pass is still running in native code: outputs are flushed, so leave now rather than
            # wait for it (Ctrl+C must take 2 s) or let interpreter shutdown run under it (it can abort).
            if bug is not None:
                traceback.print_exception(bug)
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if bug is not None:
        raise bug
    return code


def _announce(rec, args) -> None:
    """What was set up that the user cannot see otherwise: the WebSocket port (--ws 0 picks a free one). (Faults
    are printed by the recognizer's log as they happen.)"""
    from realtime.sinks import WebSocketSink

    ws = rec.sinks.find(WebSocketSink) if args.ws and rec.sinks is not None else None
    if ws is not None:
        print(f"mcihn-live: WebSocket on {ws.url}", file=sys.stderr, flush=True)


def _report_losses(rec) -> bool:
    """One error line per output that failed (its events are lost) and for a recording that stopped."""
    lines = [failure.line() for failure in (rec.sinks.failures if rec.sinks is not None else [])]
    recorder = getattr(rec, "recorder", None)
    if recorder is not None and recorder.error:
        lines.append(f"{recorder.error}; the recording in {recorder.folder} is incomplete")
    for line in lines:
        print(f"mcihn-live: error: {line}", file=sys.stderr)
    return bool(lines)


def _summary(rec) -> None:
    event = rec.latest_event
    if event is None:
        print("mcihn-live: no update was emitted", file=sys.stderr)
        return
    print(f"mcihn-live: {event.seq + 1} updates, {event.skipped_ticks} ticks skipped, {event.dropped_frames} frames "
          f"dropped; last capture->emit {event.latency_ms['capture_to_emit']:.0f} ms"
          + ("; scores UNTRAINED (random stand-in models)" if event.untrained else ""), file=sys.stderr)
    faults = [f for f in rec.faults if f != rec.error]  # the error that ended the session has its own line
    if faults:  # each was printed when it happened
        print(f"mcihn-live: {len(faults)} fault{'s' if len(faults) > 1 else ''} during the session (above)",
              file=sys.stderr)
