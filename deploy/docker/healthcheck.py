"""Container health probe: exit 0 when the local server answers 200 on a path, else 1.

The images have no curl; this uses only the standard library so that it runs in any of them.
Usage: python healthcheck.py [/health|/ready]   (port from DELTASERVE_PORT, default 8000)
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def probe_url(path: str, environ: dict[str, str]) -> str:
    """The URL of `path` on this container's server, port from DELTASERVE_PORT."""
    port = environ.get("DELTASERVE_PORT", "8000")
    return f"http://127.0.0.1:{port}{path}"


def is_healthy(url: str, timeout: float = TIMEOUT_S) -> bool:
    """True when `url` answers HTTP 200 within `timeout` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str]) -> int:
    """Exit status of the container's health check: 0 when GET `argv[1]` (default /health) answers healthy."""
    path = argv[1] if len(argv) > 1 else "/health"
    return 0 if is_healthy(probe_url(path, dict(os.environ))) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
