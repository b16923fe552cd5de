"""The peer side of the line protocol of `benchmarks/common.py` (no third-party imports).

`serve(handlers)` reads one JSON request per line from stdin, `{"op": NAME, ...}`, calls
`handlers[NAME](**rest)` and writes `{"ok": true, ...its dict}` (or `{"ok": false, "error":
traceback}`) as one line to the real stdout. Anything else printed (library warnings) goes to
stderr, which the driver keeps in a log file.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable


def serve(handlers: dict[str, Callable[..., dict]]) -> None:
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # C-level and Python prints now land on stderr
    sys.stdout = sys.stderr
    with os.fdopen(reply_fd, "w", buffering=1) as out:
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            op = request.pop("op")
            if op == "quit":
                out.write(json.dumps({"ok": True}) + "\n")
                break
            try:
                reply = {"ok": True, **handlers[op](**request)}
            except Exception:
                reply = {"ok": False, "error": traceback.format_exc()}
            out.write(json.dumps(reply) + "\n")
