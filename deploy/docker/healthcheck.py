"""The image's HEALTHCHECK: healthy when GET $SMARTPUSH_HEALTHCHECK_URL answers 2xx within 4 s.

Default: serve's /healthz (200 when the ledger and the broker answer). Workers set it to their
metrics port, e.g. http://127.0.0.1:9191/metrics.
"""

import os
import sys
import urllib.request

URL = os.environ.get("SMARTPUSH_HEALTHCHECK_URL", "http://127.0.0.1:8080/healthz")

try:
    with urllib.request.urlopen(URL, timeout=4) as answer:
        sys.exit(0 if 200 <= answer.status < 300 else 1)
except Exception as exc:  # refused, timeout, HTTP 503: unhealthy, and say why in `docker inspect`
    print(f"unhealthy: {URL}: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(1)
