"""``gunicorn -c gunicorn.conf.py app:app``: the settings and hooks live in the package,
dtmf_service/wiring/gunicorn_conf.py, where ``dtmf-gateway serve`` finds them too.

gunicorn executes this file again at every reload (SIGHUP): the package module is read again with it,
so a changed environment file or DTMF_CONFIG_FILE reaches the new settings.
"""

import importlib

from dtmf_service.wiring import gunicorn_conf as _conf

importlib.reload(_conf)
globals().update({name: value for name, value in vars(_conf).items() if not name.startswith("__")})
