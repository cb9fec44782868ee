"""The documentation holds together: every relative link in README.md, docs/*.md and
bench/README.md names a file that exists and, after a ``#``, one of that file's headings as
GitHub spells its anchor; every section that code, comments or documents cite by name
(README "From SQL", docs/reference.md, "The command line") is still a heading of that file;
and the README opens with its two commands and the way to a relay on one's own database.

GitHub's anchors: the heading's text, lower-cased, every character that is not a letter, a
digit, a space, ``-`` or ``_`` dropped, spaces turned into ``-``; a repeated anchor gets
``-1``, ``-2``... Headings and links inside fenced code blocks are not markdown, and neither
are links inside inline code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LINKED_DOCS = [README, REPO / "bench" / "README.md", *DOCS]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if re.match(r"^\s*(```|~~~)", line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def headings(path: Path) -> list[str]:
    return [m[1] for line in prose_lines(path.read_text()) if (m := HEADING.match(line))]


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(path):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def broken_links(path: Path) -> list[str]:
    """Each relative link of ``path`` whose file or anchor does not exist, with the reason."""
    problems = []
    for line in prose_lines(path.read_text()):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if SCHEME.match(target):
                continue  # https:, mailto: ...
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{target}: no file {dest}")
            elif anchor and dest.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not markdown")
            elif anchor and anchor not in anchors(dest):
                problems.append(f"{target}: no heading of {dest.name} has the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("path", LINKED_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_link_check_reports_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## The command line\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page: one (two)\n\n## Same\n\n## Same\n\n"
        "[ok](other.md#the-command-line) [ok](#page-one-two) [ok](#same-1) [ok](other.md)\n"
        "[web](https://example.com/x#y) `[code](missing.md)`\n"
        "[gone](missing.md) [bad](other.md#the-command) [bad](#same-2)\n"
        "```\n[fenced](missing.md)\n## Not a heading\n```\n[bad](#not-a-heading)\n"
    )
    assert broken_links(page) == [
        f"missing.md: no file {tmp_path / 'missing.md'}",
        "other.md#the-command: no heading of other.md has the anchor #the-command",
        "#same-2: no heading of page.md has the anchor #same-2",
        "#not-a-heading: no heading of page.md has the anchor #not-a-heading",
    ]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("AppFunnel → Customer.io relay", "appfunnel--customerio-relay"),
        ("Recording events (the application side)", "recording-events-the-application-side"),
        ("The schema: three ways to migrate", "the-schema-three-ways-to-migrate"),
        ("`python -m bench.record_event`", "python--m-benchrecord_event"),
        ("Delivery guarantees, in full", "delivery-guarantees-in-full"),
    ],
)
def test_anchors_are_spelt_as_github_spells_them(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


# A section cited by name: README "From SQL", README.md ("Message states"),
# docs/reference.md, "The command line", bench/README.md, "Latency"; the name may wrap.
CITATION = re.compile(
    r"(?<![\w/.\"-])(bench/README\.md|docs/[\w-]+\.md|README(?:\.md)?)[,:]?\s*\(?\s*"
    r"\"([A-Za-z`][^\"]{0,80}?)\""
)
CODE = ("relay", "models", "alembic", "tests", "bench")
CITING = [
    README,
    REPO / "CHANGELOG.md",
    REPO / "Dockerfile",
    REPO / "compose.yaml",
    *LINKED_DOCS[1:],
    *(path for top in CODE for path in (REPO / top).rglob("*.py")),
    *(p for p in (REPO / "deploy").rglob("*") if p.is_file()),
    *(REPO / "tests" / "sampleapp").rglob("*.ini"),
]


def cited_sections() -> list[tuple[Path, str, str]]:
    out = []
    for path in CITING:
        if "__pycache__" in path.parts or path == Path(__file__).resolve():
            continue
        for name, section in CITATION.findall(path.read_text()):
            section = " ".join(re.sub(r"\n\s*#", " ", section).split())  # wrapped, commented
            out.append((path, "README.md" if name == "README" else name, section))
    return out


def test_every_cited_section_is_a_heading_of_the_file_cited() -> None:
    cited = cited_sections()
    assert len(cited) > 10  # README "From SQL" alone is cited from several files
    missing = []
    for path, name, section in cited:
        titles = [h.replace("`", "") for h in headings(REPO / name)]
        if not any(title.startswith(section) for title in titles):
            missing.append(f'{path.relative_to(REPO)}: {name} "{section}"')
    assert missing == []


def test_readme_links_every_document() -> None:
    targets = {
        (REPO / t.partition("#")[0]).resolve()
        for line in prose_lines(README.read_text())
        for t in LINK.findall(line)
        if not SCHEME.match(t) and not t.startswith("#")
    }
    assert set(LINKED_DOCS[1:]) <= targets, sorted(map(str, set(LINKED_DOCS[1:]) - targets))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_each_document_opens_with_a_paragraph_saying_what_it_covers(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == "", lines[:2]
    assert re.match(r"[A-Za-z`\[]", lines[2]), f"{path.name}: no opening paragraph"
    assert len(" ".join(lines[2 : lines.index("", 2)]).split()) >= 20


def test_readme_opens_with_the_demo_and_test_commands_then_the_own_database() -> None:
    text = README.read_text()
    blocks = re.findall(r"(?:(<!-- [\w-]+ -->)\n)?```\w*\n(.*?)```", text, re.S)
    assert [marker for marker, _ in blocks[:2]] == ["<!-- run-command -->", "<!-- test-command -->"]
    assert blocks[0][1].rstrip().endswith(".venv/bin/relay demo")
    assert blocks[1][1].rstrip().endswith(".venv/bin/python -m pytest -q")
    # The third block, on the first screen: a relay on the application's own PostgreSQL.
    assert text.index(blocks[2][1]) < len("\n".join(text.splitlines()[:40]))
    own = blocks[2][1]
    for needed in ("DATABASE_URL=", "CUSTOMERIO_WRITE_KEY=", "relay migrate", "relay run"):
        assert needed in own, needed
    assert own.index("relay migrate") < own.index("relay run")
