"""``fastllava serve``: flags -> ServerSettings + engine loader -> uvicorn. Entry point ``serve_main(argv) -> int``.

Safe by default: binds 127.0.0.1; remote images only from public addresses (private/loopback hosts only when listed
in --allowed-media-domains, which then is an allow-list); file:// images only under --allowed-local-media-path; at
most --limit-images-per-prompt images per request; bodies over --max-body-bytes refused; --max-queued-requests
bounds admission (503 + Retry-After beyond it). The API key may also come from the FASTLLAVA_API_KEY environment
variable (so that it does not show in the process list).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fastllava.server.media import MediaPolicy
from fastllava.server.settings import MiB, ServerSettings

logger = logging.getLogger("fastllava.server")


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastllava serve", description="OpenAI-compatible API and web chat page.")
    p.add_argument("--model", help="checkpoint directory or hub id (default: the bundled demo model)")
    p.add_argument("--served-model-name", help="the model id clients use (default: from --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-hosts", type=_csv, default=None, metavar="NAME[,NAME...]",
                   help="Host header names the server answers to ('*': any); default when bound to loopback: "
                        "localhost, 127.0.0.1, ::1 (a guard against DNS rebinding), otherwise any")
    p.add_argument("--api-key", default=os.environ.get("FASTLLAVA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health and the page "
                        "(default: $FASTLLAVA_API_KEY, else none)")
    media = p.add_argument_group("media (image URLs in requests)")
    media.add_argument("--allowed-media-domains", type=_csv, default=None, metavar="HOST[,HOST...]",
                       help="only fetch images from these hosts (these may be private or loopback); default: any "
                            "host with a public address")
    media.add_argument("--allowed-local-media-path", type=Path, default=None, metavar="DIR",
                       help="allow file:// image URLs under this directory (default: refused)")
    media.add_argument("--limit-images-per-prompt", type=int, default=8)
    media.add_argument("--max-media-bytes", type=int, default=20 * MiB, help="per image (default 20 MiB)")
    media.add_argument("--max-image-pixels", type=int, default=8192 * 8192,
                       help="width x height, checked before decoding")
    media.add_argument("--media-connect-timeout", type=float, default=5.0)
    media.add_argument("--media-timeout", type=float, default=10.0, help="total seconds per image fetch")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-queued-requests", type=int, default=64,
                        help="requests admitted beyond those running; more get 503 + Retry-After")
    limits.add_argument("--max-body-bytes", type=int, default=32 * MiB, help="largest request body (default 32 MiB)")
    limits.add_argument("--max-concurrent-uploads", type=int, default=None,
                        help="requests with a body read at once (default: max-num-seqs + max-queued-requests + 8); "
                             "bounds the memory held by bodies to this times --max-body-bytes")
    limits.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds from arrival to the last token, then the request is aborted")
    limits.add_argument("--max-n", type=int, default=16, help="largest n (choices per request)")
    limits.add_argument("--default-max-tokens", type=int, default=None,
                        help="max_tokens of chat requests that give none (default: until the context is full)")
    model = p.add_argument_group("model and engine")
    model.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto")
    model.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization")
    model.add_argument("--max-num-seqs", type=int, default=8, help="requests the engine runs at once")
    model.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    model.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per engine step")
    model.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens")
    model.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache size in bytes (default 2 GiB)")
    model.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix (KV) cache")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    policy = MediaPolicy(
        allowed_domains=MediaPolicy.normalize_domains(args.allowed_media_domains),
        allowed_local_path=args.allowed_local_media_path.resolve() if args.allowed_local_media_path else None,
        max_bytes=args.max_media_bytes, max_pixels=args.max_image_pixels, max_images=args.limit_images_per_prompt,
        connect_timeout=args.media_connect_timeout, total_timeout=args.media_timeout,
    )
    name = args.served_model_name or (Path(args.model).name if args.model else "fastllava-demo")
    if args.allowed_hosts is not None:
        trusted = None if "*" in args.allowed_hosts else frozenset(h.lower().strip("[]").rstrip(".")
                                                                  for h in args.allowed_hosts)
    else:
        trusted = frozenset({"localhost", "127.0.0.1", "::1"}) if _is_loopback(args.host) else None
    return ServerSettings(
        model_name=name, api_key=args.api_key or None, media=policy, max_running_requests=args.max_num_seqs,
        max_queued_requests=args.max_queued_requests, max_body_bytes=args.max_body_bytes,
        max_concurrent_bodies=args.max_concurrent_uploads,
        request_timeout=args.request_timeout, default_max_tokens=args.default_max_tokens, max_n=args.max_n,
        max_model_len=args.max_model_len, trusted_hosts=trusted,
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
               "max_num_batched_tokens": args.max_num_batched_tokens, "kv_cache_tokens": args.kv_cache_tokens,
               "kv_cache_bytes": args.kv_cache_bytes, "max_queued_requests": args.max_queued_requests,
               "enable_prefix_caching": False if args.no_prefix_caching else None}
    return {key: value for key, value in options.items() if value is not None}


def make_loader(args: argparse.Namespace):
    def load() -> tuple[Any, Any]:
        from fastllava.cli import load_model_and_processor
        from fastllava.engine import AsyncEngine

        model, processor = load_model_and_processor(args.model, args.dtype, args.device, args.quantize)
        return AsyncEngine(model, processor, **engine_options(args)), processor

    return load


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        print(f"error: --allowed-local-media-path {args.allowed_local_media_path} is not a directory", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    if not _is_loopback(args.host) and settings.api_key is None:
        logger.warning("serving on %s without --api-key: anyone who can reach this address can use the model",
                       args.host)

    import uvicorn

    from fastllava.server.app import create_app

    if args.model is None:
        from fastllava.cli import DEMO_MODEL

        if not (DEMO_MODEL / "config.json").is_file():
            print("error: the bundled demo model is missing from this installation; pass --model DIR_OR_HUB_ID",
                  file=sys.stderr)
            return 2
    failures: list[str] = []

    def on_load_failure(message: str) -> None:  # a server that cannot serve exits (non-zero) instead of idling
        failures.append(message)
        server.should_exit = True

    app = create_app(settings, make_loader(args), on_load_failure)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=5, server_header=False)
    server = uvicorn.Server(config)
    print(f"fastllava serve: model '{settings.model_name}' on http://{args.host}:{args.port}/ "
          f"(OpenAI API under /v1, chat page at /)", flush=True)
    server.run()
    if failures:
        print(f"error: the model could not be loaded: {failures[0]}", file=sys.stderr)
        return 1
    return 0
