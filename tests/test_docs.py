"""The docs hold together: every relative link reaches a file and heading, and the README stays a front page."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# CI runs this line exactly as the README's first bash block gives it: it is the newcomer's first try.
NEWCOMER_COMMAND = ('bash 0_install.sh && bash 1_pretrain_our.sh && bash 2_inference_encode.sh && '
                    'bash 3_inference_search.sh --query "a red circle"')
TEST_COMMAND = "bash 0_install.sh && HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q"
README_MAX_LINES = 250

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def pages() -> list[Path]:
    """The Markdown pages whose links are checked: the front page, docs/, and the top-level pages."""
    named = [README, REPO / "ARCHITECTURE.md", REPO / "BENCHMARKS.md", REPO / "benchmarks" / "README.md"]
    return [page for page in named if page.is_file()] + sorted((REPO / "docs").glob("*.md")) + sorted(
        (REPO / "dataset").glob("*/README.md"))


def prose_lines(text: str) -> list[tuple[str, bool]]:
    """Each line with whether it is prose (outside fenced code blocks)."""
    lines, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            lines.append((line, False))
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            lines.append((line, False))
        else:
            lines.append((line, True))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lowercased, punctuation but '-' and '_' dropped,
    spaces turned into hyphens."""
    text = CODE_SPAN.sub(lambda match: match.group(2), heading)
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # images render no text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders its text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page offers: its headings' slugs, with -1, -2 ... for repeats, and HTML anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line, is_prose in prose_lines(page.read_text(encoding="utf-8")):
        if not is_prose:
            continue
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    """The targets of a page's inline links, images and reference definitions, outside code."""
    targets = []
    for line, is_prose in prose_lines(page.read_text(encoding="utf-8")):
        if not is_prose:
            continue
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            targets.append(definition.group(1))
            continue
        targets.extend(INLINE_LINK.findall(CODE_SPAN.sub("", line)))
    return targets


def tracked_files() -> set[Path] | None:
    """The files git tracks (resolved), or None outside a git checkout (then existing on disk is enough)."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return {(REPO / name).resolve() for name in listing.stdout.decode("utf-8", "surrogateescape").split("\0") if name}


TRACKED = tracked_files()


def broken_link(page: Path, target: str) -> str | None:
    """Why a link from `page` does not resolve, or None when it does."""
    path_part, _, fragment = target.partition("#")
    if path_part:
        destination = (page.parent / path_part).resolve()
        if REPO.resolve() not in destination.parents and destination != REPO.resolve():
            return "points outside the repository"
        if not destination.exists():
            return "no such file"
        if TRACKED is not None and destination.is_file() and destination not in TRACKED:
            return "the file is not in git (a fresh clone would not have it)"
    else:
        destination = page
    if fragment and destination.suffix == ".md" and fragment not in anchors(destination):
        return f"no heading with anchor #{fragment} in {destination.relative_to(REPO.resolve())}"
    return None


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        reason = broken_link(page, target)
        if reason:
            broken.append(f"{target}: {reason}")
    assert not broken, f"broken links in {page.relative_to(REPO)}:\n" + "\n".join(broken)


def test_slugs_follow_githubs_rule():
    assert slug("Quality against open_clip's trainer (Flickr8k, equal CPU time)") == (
        "quality-against-open_clips-trainer-flickr8k-equal-cpu-time")
    assert slug("Search: where the time goes") == "search-where-the-time-goes"
    assert slug("`--load_model` and [released weights](x.md)") == "--load_model-and-released-weights"


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n## Setup\n\n```bash\n# not a heading\n```\n\n## Setup\n", encoding="utf-8")
    assert anchors(page) == {"notes", "setup", "setup-1"}


def test_the_readme_opens_with_the_newcomers_command_and_the_test_command():
    first_block, fence = [], None
    for line, is_prose in prose_lines(README.read_text(encoding="utf-8")):
        if fence is None and not is_prose:
            fence = FENCE.match(line)
            assert fence.group(2) == "bash", "the README's first code block must be its bash block of commands"
            continue
        if fence is not None:
            if is_prose or FENCE.match(line):
                break
            first_block.append(line)
    assert first_block[:2] == [NEWCOMER_COMMAND, TEST_COMMAND]


def test_the_readme_stays_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines: move detail into docs/"
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in links(README)}
    unlinked = [page.name for page in sorted((REPO / "docs").glob("*.md")) if page.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
