"""The README's promises that code can check: the two quick-start commands, and that CI
runs the test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    section = section.split("### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    return [b.strip() for b in blocks]


def test_quick_start_is_exactly_two_commands() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert commands[0].endswith("tagrelay serve")
    assert commands[1].endswith("pytest")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci


def test_readme_embeds_the_current_config_reference() -> None:
    from tagrelay.config.reference import render_reference

    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- reference:start -->\n", "<!-- reference:end -->"
    embedded = readme.split(start, 1)[1].split(end)[0]
    assert embedded.strip() == render_reference().strip(), (
        "README's config reference is stale: paste the output of "
        "python -m tagrelay.config.reference between the markers"
    )


def test_readme_snippet_is_the_one_the_relay_renders() -> None:
    from tagrelay.config.models import Config
    from tagrelay.web.script import render_snippet

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The tracking script", 1)[1]
    documented = re.findall(r"```html\n(.*?)```", section, flags=re.S)[0]
    config = Config.model_validate({"keys": [{"id": "w", "kind": "browser", "key": "k"}]})
    rendered = render_snippet(config, "https://data.example.com/p.js", "YOUR_BROWSER_KEY")
    assert documented.strip() == rendered.strip()


def test_readme_holds_no_merge_conflict_markers() -> None:
    readme = (ROOT / "README.md").read_text()
    markers = re.findall(r"^(?:<{7}|={7}|>{7})(?: .*)?$", readme, flags=re.M)
    assert markers == []
