"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py app:app`` (or ``dtmf-gateway serve``).

The application is built in dtmf_service/wiring/wsgi.py, which refuses to serve under a server
that ran none of the service's lifecycle (wiring/lifecycle.py).
"""

from dtmf_service.wiring.wsgi import app, create_app

__all__ = ["app", "create_app"]
