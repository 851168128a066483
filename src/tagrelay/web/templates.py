"""Where the top-level ``templates/`` folder (the tracking script, HTML pages) is found.

In a source checkout or an editable install it is the repository's ``templates/``; a
regular install ships it as data files under ``<prefix>/share/tagrelay/templates``.
``TAGRELAY_TEMPLATES`` overrides both.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path

from tagrelay.errors import TagrelayError


@cache
def templates_dir() -> Path:
    override = os.environ.get("TAGRELAY_TEMPLATES")
    candidates = [Path(override)] if override else []
    candidates += [
        Path(__file__).resolve().parents[3] / "templates",
        Path(sys.prefix) / "share" / "tagrelay" / "templates",
    ]
    for candidate in candidates:
        if (candidate / "p.js").is_file():
            return candidate
    raise TagrelayError(
        "the templates folder (with p.js) was not found; looked in "
        + ", ".join(str(c) for c in candidates)
    )
