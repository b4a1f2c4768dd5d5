"""Flag parsing shared by the ``python -m experiments.<x> --config=... --config.field=...`` CLIs."""

from __future__ import annotations

import sys
from typing import Any

from absl import app


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a readable error for an unknown ``--config.<field>``.

    Pass as ``app.run(main, flags_parser=parse_flags)``.
    """
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        # ml_collections raises these (not a flags error) for overrides of absent fields.
        detail: Any = e
        while isinstance(detail, BaseException) and detail.args:
            detail = detail.args[0]  # the KeyError inside, then its ("'name'\nDid you mean...")
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        sys.exit(f"FATAL Flags parsing error: the config has no field {detail}\n"
                 f"Check the --config.<field> overrides ({overrides}) against the config file.")


def config_and_workdir(argv: list[str], config: Any, workdir: Any) -> tuple[Any, str]:
    """The values of the ``--config`` and ``--workdir`` flag holders, both required.

    Raises:
      app.UsageError: for positional arguments or a missing flag.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config.value is None:
        raise app.UsageError("--config is required")
    if not workdir.value:
        raise app.UsageError("--workdir is required")
    return config.value, workdir.value
