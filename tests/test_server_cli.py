"""``fastllava serve`` flags (fastllava/server/cli.py): safe defaults, what each flag sets, and a model that cannot be
loaded ending the process with an error instead of a server that answers 503 forever."""

from __future__ import annotations

import socket

from fastllava.server.cli import build_parser, engine_options, serve_main, settings_from_args


def test_defaults_are_safe(monkeypatch):
    monkeypatch.delenv("FASTLLAVA_API_KEY", raising=False)
    args = build_parser().parse_args([])
    settings = settings_from_args(args)
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)
    assert settings.model_name == "fastllava-demo" and settings.api_key is None
    media = settings.media
    assert media.allowed_domains is None and media.allowed_local_path is None  # public hosts only, no file://
    assert media.max_images == 8 and media.max_bytes == 20 << 20 and media.max_pixels == 8192 * 8192
    assert (media.connect_timeout, media.total_timeout, media.max_redirects) == (5.0, 10.0, 3)
    assert settings.max_body_bytes == 32 << 20 and settings.max_queued_requests == 64
    assert engine_options(args) == {"max_num_seqs": 8, "max_queued_requests": 64}
    assert settings.trusted_hosts == frozenset({"localhost", "127.0.0.1", "::1"})  # DNS-rebinding guard on loopback


def test_flags_reach_settings_and_engine(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTLLAVA_API_KEY", raising=False)
    args = build_parser().parse_args([
        "--model", str(tmp_path / "my-model"), "--host", "0.0.0.0", "--port", "9000", "--api-key", "k",
        "--allowed-media-domains", "Images.Example.com., 127.0.0.1", "--allowed-local-media-path", str(tmp_path),
        "--limit-images-per-prompt", "2", "--max-queued-requests", "5", "--max-body-bytes", "1000",
        "--request-timeout", "30", "--max-num-seqs", "3", "--max-model-len", "512", "--kv-cache-tokens", "4096",
        "--no-prefix-caching", "--dtype", "bfloat16",
    ])
    settings = settings_from_args(args)
    assert settings.model_name == "my-model" and settings.api_key == "k"
    assert settings.trusted_hosts is None  # bound to every interface: any Host unless --allowed-hosts says
    assert settings_from_args(build_parser().parse_args(["--allowed-hosts", "chat.example.com,[::1]"])).trusted_hosts \
        == frozenset({"chat.example.com", "::1"})
    assert settings_from_args(build_parser().parse_args(["--allowed-hosts", "*"])).trusted_hosts is None
    assert settings.media.allowed_domains == frozenset({"images.example.com", "127.0.0.1"})
    assert settings.media.allowed_local_path == tmp_path.resolve() and settings.media.max_images == 2
    assert (settings.max_queued_requests, settings.max_running_requests, settings.max_in_flight) == (5, 3, 8)
    assert (settings.max_body_bytes, settings.request_timeout, settings.max_model_len) == (1000, 30.0, 512)
    assert engine_options(args) == {"max_num_seqs": 3, "max_model_len": 512, "kv_cache_tokens": 4096,
                                    "max_queued_requests": 5, "enable_prefix_caching": False}


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("FASTLLAVA_API_KEY", "from-env")
    assert settings_from_args(build_parser().parse_args([])).api_key == "from-env"


def test_bad_local_media_path_is_refused_before_starting(tmp_path, capsys):
    assert serve_main(["--model", str(tmp_path), "--allowed-local-media-path", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_a_model_that_cannot_load_ends_the_server(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert serve_main(["--model", str(tmp_path / "missing"), "--port", str(port), "--log-level", "warning"]) == 1
    err = capsys.readouterr().err
    assert "could not be loaded" in err and "missing" in err
