"""The WSGI entry point: ``gunicorn app:app``."""

import sys

from dtmf_service import create_app
from dtmf_service.config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    # One clear line, then exit code 4: gunicorn's "App failed to load", which stops the master too.
    print(f"dtmf-gateway: configuration error: {exc}", file=sys.stderr, flush=True)
    sys.exit(4)

__all__ = ["app", "create_app"]
