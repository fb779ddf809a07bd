"""`mcihn serve`: the extractors and the fusion of a checkpoint (or the starter) on Triton Inference Server, with
dynamic batching across the streams of many `mcihn-live --server HOST:PORT` stations (realtime/serve.py,
docs/scaling.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  mcihn serve                                  # the starter's models on 127.0.0.1:8000 (gRPC 8001, metrics 8002)
  mcihn serve 0.0.0.0:8000 --checkpoint runs/meld/seed_0
  mcihn serve --standins base --max-batch 8 --queue-delay-ms 2
  mcihn-live --server 127.0.0.1:8000 --source clip.mp4   # a station using it
  mcihn serve --prepare                        # only make the Triton stub's environment (make install does)
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the live models on Triton Inference Server (many streams)",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("address", nargs="?", default="127.0.0.1:8000",
                   help="[HOST:]PORT for HTTP (default 127.0.0.1:8000: loopback only); gRPC on PORT+1, metrics on "
                        "PORT+2 unless given")
    p.add_argument("--grpc-port", type=int, default=None)
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--checkpoint", help="a checkpoint folder written by `mcihn train` (default: the starter)")
    p.add_argument("--standins", choices=("tiny", "base"), help="random stand-in models (untrained): tests, bench")
    p.add_argument("--backend", default="auto", help="auto | torch | onnxruntime | tensorrt")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is a GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per model backend (default: half the cores)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the dynamic batcher forms (8)")
    p.add_argument("--queue-delay-ms", type=float, default=1.0,
                   help="how long a request may wait for others to batch with (1 ms)")
    p.add_argument("--cache-dir", default=None, help="models and ONNX files (~/.cache/mcihn-live)")
    p.add_argument("--batch-log", help="a JSON file kept up to date with the batch sizes formed (mcihn bench reads it)")
    p.add_argument("--prepare", action="store_true", help="make the Triton stub's environment, then exit")


def run(args) -> int:
    from realtime.config import DEFAULT_CACHE, ConfigError, LiveConfig
    from realtime.remote import parse_address
    from realtime.serve import prepare_stub_env, serve

    if args.prepare:
        print(f"mcihn serve: the Triton stub's environment is {prepare_stub_env(quiet=False)}")
        return 0
    host, port = parse_address(args.address)
    if args.max_batch < 1 or args.queue_delay_ms < 0:
        raise ConfigError("--max-batch must be 1 or more and --queue-delay-ms 0 or more")
    config = LiveConfig(checkpoint=args.checkpoint, standins=args.standins, source="push", backend=args.backend,
                        device=args.device, threads=args.threads, cache_dir=args.cache_dir or str(DEFAULT_CACHE),
                        limit_process_threads=True)

    def ready(urls: dict) -> None:
        print(f"mcihn serve: Triton serving {', '.join(urls['models'])} on http {urls['http']}, grpc {urls['grpc']}, "
              f"metrics {urls['metrics']} (dynamic batching up to {args.max_batch}); Ctrl+C stops", flush=True)

    batches = serve(config, host, port, args.grpc_port, args.metrics_port, args.max_batch,
                    int(args.queue_delay_ms * 1000), on_ready=ready,
                    batch_log=Path(args.batch_log) if args.batch_log else None)
    print(f"mcihn serve: stopped; {batches.summary()}", file=sys.stderr)
    return 0
