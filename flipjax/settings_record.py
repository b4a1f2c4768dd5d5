"""A run's defining settings, recorded beside its outputs so that a rerun cannot mix settings.

Long jobs here resume: a clip build, a planning run, a rollout cache and an evaluation log all
pick up where an interrupted run stopped. Resuming with other settings would silently mix two
experiments in one output, so each job records the settings that define its outputs on the
first run and refuses a rerun that changes any of them, naming every change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def describe_changes(recorded: Mapping[str, Any], requested: Mapping[str, Any], *,
                     ignore: Iterable[str] = (), recorded_as: str = "recorded") -> str:
    """The settings that differ, as ``"key: recorded X vs requested Y, ..."`` ('' if none).

    Args:
      recorded: the settings the outputs were made with.
      requested: the settings of this run.
      ignore: keys a rerun may change (e.g. adding tasks to an evaluation log).
      recorded_as: the word for the recorded side in the message (e.g. "cached").

    Returns:
      The changes in key order, or the empty string.
    """
    skip = set(ignore)
    keys = sorted((set(recorded) | set(requested)) - skip)
    return ", ".join(f"{k}: {recorded_as} {recorded.get(k)!r} vs requested {requested.get(k)!r}"
                     for k in keys if recorded.get(k) != requested.get(k))


def read_json_object(path: str | Path, remedy: str = "") -> dict[str, Any]:
    """The JSON object in ``path``.

    Args:
      path: a JSON file.
      remedy: appended to the error ("; {remedy}") when given.

    Raises:
      ValueError: naming the file, when it is not JSON or does not hold an object.
    """
    tail = f"; {remedy}" if remedy else ""
    try:
        value = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}){tail}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object (got {type(value).__name__}){tail}")
    return value


def record_or_check(path: str | Path, settings: Mapping[str, Any], *, refusal: str,
                    remedy: str, recorded_as: str = "recorded") -> None:
    """Writes ``settings`` to ``path`` (JSON, atomically), or checks a rerun keeps them.

    Args:
      path: the settings file beside the outputs.
      settings: JSON-serialisable settings that define the outputs.
      refusal: what the error says first, e.g. "--out D holds clips built with other options".
      remedy: what the error tells the user to do, e.g. "use a new --out or delete it".
      recorded_as: the word for the recorded side in the message.

    Raises:
      ValueError: ``"{refusal} ({changes}); {remedy}"`` when a recorded setting differs, or
        when the file is not a JSON object (naming the file).
    """
    path = Path(path)
    want = json.loads(json.dumps(dict(settings)))  # tuples -> lists, as read back
    if path.exists():
        have = read_json_object(path, remedy)
        changes = describe_changes(have, want, recorded_as=recorded_as)
        if changes:
            raise ValueError(f"{refusal} ({changes}); {remedy}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(want, indent=1, sort_keys=True))
    os.replace(tmp, path)


__all__ = ["describe_changes", "read_json_object", "record_or_check"]
