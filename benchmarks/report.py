"""Writing a benchmark's figures: one JSON file, replaced atomically so a reader never sees half."""

from __future__ import annotations

import json
import os
from typing import Any


def write_result(out: str, result: dict[str, Any]) -> None:
    """Writes ``result`` to ``out`` (JSON) and prints which targets were met.

    Args:
      out: destination path; parent folders are created.
      result: the figures; must hold ``targets_met``.
    """
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    os.replace(tmp, out)
    print(f"targets met: {result['targets_met']}\nwrote {out}", flush=True)
