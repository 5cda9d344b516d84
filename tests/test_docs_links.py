"""The documentation's relative links resolve: every file they name exists, every ``#anchor`` is a heading there,
and every number the README shows as a link points at a measured result under ``bench/results/``."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
NUMBER = re.compile(r"^[−+\-]?\d[\d.,]*\s*(±\s*[\d.]+)?\s*%?$")


def _markdown_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True)
        files = [ROOT / p for p in out.stdout.split()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): every .md under the tree
        files = [p for p in ROOT.rglob("*.md") if ".venv" not in p.parts and ".git" not in p.parts]
    return sorted(p for p in files if p.is_file())


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(lines)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        if fenced:
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    out.update(re.findall(r'<a (?:name|id)="([^"]+)"', path.read_text(encoding="utf-8")))
    return out


def _links(path: Path) -> list[tuple[str, str]]:
    prose = _prose(path.read_text(encoding="utf-8"))
    return LINK.findall(prose) + [("", t) for t in IMAGE.findall(prose)]


DOCS = _markdown_files()


def test_there_is_documentation_to_check():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert "README.md" in names and any(n.startswith("docs/") for n in names)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path):
    broken = []
    for _, target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_numbers_link_to_measured_results():
    readme = ROOT / "README.md"
    wrong = [f"[{text}]({target})" for text, target in _links(readme)
             if NUMBER.match(text.strip("*")) and "bench/results/" not in target]
    assert not wrong, "README numbers must link to their source under bench/results/: " + ", ".join(wrong)


def test_the_slug_rule_matches_githubs():
    assert _slug("Quick start (`quickstart.sh`)") == "quick-start-quickstartsh"
    assert _slug("λ, relative λ and s") == "λ-relative-λ-and-s"
    assert _slug("MAP closed form") == "map-closed-form"
    slug = _slug("`solve_speed.py`: the solver on Llama-3.1-8B shapes")
    assert slug == "solve_speedpy-the-solver-on-llama-31-8b-shapes"
