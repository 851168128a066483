"""Where the top-level ``templates/`` folder (the tracking script, HTML pages) is found.

An installed package (a wheel, ``pip install``, ``pip install --user``, a system Python)
carries it inside itself as ``tagrelay/templates`` (``pyproject.toml`` maps the folder
there), found through the package's own resources (``importlib.resources``), wherever the
package was installed. A source checkout, or an editable install of one, has no copy in the
package: there it is the repository's ``templates/``. ``TAGRELAY_TEMPLATES`` overrides both.
"""

from __future__ import annotations

import os
from functools import cache
from importlib import resources
from pathlib import Path

from tagrelay.errors import TagrelayError

CHECKOUT_TEMPLATES = Path(__file__).resolve().parents[3] / "templates"
"""``templates/`` of the source checkout this module runs from (src/tagrelay/web/...)."""


def packaged_templates() -> Path | None:
    """The templates the installed package carries, when it carries them as files."""
    found = resources.files("tagrelay") / "templates"
    return found if isinstance(found, Path) else None


@cache
def templates_dir() -> Path:
    override = os.environ.get("TAGRELAY_TEMPLATES")
    candidates = [Path(override)] if override else []
    candidates += [c for c in (packaged_templates(), CHECKOUT_TEMPLATES) if c is not None]
    for candidate in candidates:
        if (candidate / "p.js").is_file():
            return candidate
    raise TagrelayError(
        "the templates folder (with p.js) was not found; looked in "
        + ", ".join(str(c) for c in candidates)
        + " (a broken install: reinstall tagrelay, or set TAGRELAY_TEMPLATES)"
    )
