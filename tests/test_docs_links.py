"""The README, docs/ and benchmarks/ pages link to files and headings that exist.

The README is short and points into docs/ and benchmarks/RESULTS.md; a moved or renamed heading
would leave a newcomer on a dead link. Anchors are computed as GitHub renders them (lower case,
punctuation dropped, spaces to hyphens, -1, -2 for repeats). No network: web links are not checked.
"""

import pathlib
import re
import unicodedata

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")])
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")


def prose(text):
    """The text outside fenced code blocks and inline code, where links render."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading):
    """GitHub's anchor for a heading's text."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = "".join(c for c in heading if c in " -" or c == "_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a markdown file, repeats numbered as GitHub does."""
    seen, found = {}, set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page):
    for _, target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if not re.match(r"[a-z]+:", target):
            yield target


def test_slug_matches_github():
    assert slug("What happens when…") == "what-happens-when"
    assert slug("What `python train.py` does") == "what-python-trainpy-does"
    assert slug("Seeds 42, 43 and 44: the noise") == "seeds-42-43-and-44-the-noise"


def test_pages_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "benchmarks/RESULTS.md", "docs/commands.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_holds_the_test_command_ci_reads():
    """.ci/run runs the first fenced block after the marker: it must be there and run pytest."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text.split("<!-- test-command -->\n", 1)[1]
    block = re.match(r"```\w*\n(.*?)\n```", after, flags=re.S)
    assert block and "pytest" in block.group(1)
