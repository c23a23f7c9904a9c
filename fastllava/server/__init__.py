"""OpenAI-compatible HTTP server and web chat page over the engine (``fastllava serve``).

A thin translator: request parsing (protocol.py), safe media fetching (media.py), admission (admission.py), the
engine calls and streaming (completions.py), OpenAI-shaped errors (errors.py), Prometheus metrics (metrics.py), API
key and body-size guard (guard.py), the app and its routes (app.py), the page (static/), the command (cli.py).
Nothing here runs a model. Importing this package needs the ``serve`` extra (fastapi, uvicorn, prometheus_client).
"""

from fastllava.server.app import create_app
from fastllava.server.media import MediaPolicy
from fastllava.server.settings import ServerSettings

__all__ = ["create_app", "MediaPolicy", "ServerSettings"]
