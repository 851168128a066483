"""The README's promises that code can check: the two quick-start commands, that CI runs
the test command verbatim, a table of contents that lists every section, and the generated
configuration reference (docs/config.md) current and linked."""

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


def test_docs_config_is_the_current_config_reference() -> None:
    from tagrelay.config.reference import DOC_PATH, REGENERATE_COMMAND, render_reference

    current = (ROOT / DOC_PATH).read_text(encoding="utf-8")
    assert current == render_reference(), (
        f"{DOC_PATH} is stale: run {REGENERATE_COMMAND} from the repository's root"
    )


def test_readme_links_the_config_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    assert "[docs/config.md](docs/config.md)" in section


def headings(markdown: str) -> list[tuple[int, str, str]]:
    """``(level, title, anchor)`` of every heading outside code blocks, with the anchors
    GitHub gives them (a repeated one suffixed -1, -2...)."""
    from tagrelay.config.reference import github_anchor

    found: list[tuple[int, str, str]] = []
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#{1,6}) (.+)", line)
        if heading:
            anchor = github_anchor(heading.group(2))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            level, title = len(heading.group(1)), heading.group(2)
            found.append((level, title, f"{anchor}-{count}" if count else anchor))
    return found


def test_readme_table_of_contents_lists_every_section() -> None:
    readme = (ROOT / "README.md").read_text()
    contents = readme.split("\n## Contents\n", 1)[1].split("\n## ", 1)[0]
    links = re.findall(r"\]\(#([^)]+)\)", contents)
    sections = [h for h in headings(readme) if h[0] in (2, 3) and h[1] != "Contents"]
    anchors = {anchor for _, _, anchor in sections}
    assert [link for link in links if link not in anchors] == [], "links to no heading"
    missing = [
        ("  " if level == 3 else "") + f"- [{title}](#{anchor})"
        for level, title, anchor in sections
        if anchor not in links
    ]
    assert missing == [], "add to the README's Contents:\n" + "\n".join(missing)


def test_the_config_reference_links_its_own_sections() -> None:
    from tagrelay.config.reference import DOC_PATH

    doc = (ROOT / DOC_PATH).read_text(encoding="utf-8")
    anchors = {anchor for _, _, anchor in headings(doc)}
    links = re.findall(r"\]\(#([^)]+)\)", doc)
    assert links and [link for link in links if link not in anchors] == []
    assert "forwarders-with-type-webhook" in links


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
