"""Compact JSON (``separators=(",", ":")``), the one encoding of every body and event the service writes.

``json.dumps`` with any non-default setting builds a new ``JSONEncoder`` on every call, a third of
the cost of encoding a small object. One encoder serves every thread: encoding keeps no state
between calls. The text is exactly ``json.dumps(value, separators=(",", ":"))``.
"""

from __future__ import annotations

import json

compact = json.JSONEncoder(separators=(",", ":")).encode
