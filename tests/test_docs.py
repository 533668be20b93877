"""Documentation integrity: every ``SPEC §x.y`` / ``§x.y`` citation (and ``§15 #k`` item) in the
sources and docs names a section that exists in docs/spec.md, relative Markdown links resolve,
and nothing refers to files outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"

#: what is scanned: the package, native sources, benchmarks, tests, docs and the top-level files
SCAN_DIRS = ("v4kernels", "csrc", "bench", "tests", "docs", "scripts")
SCAN_FILES = ("README.md", "setup.py", "pyproject.toml", "Makefile")
TEXT_SUFFIXES = {".py", ".md", ".rst", ".txt", ".toml", ".cfg", ".c", ".cc", ".cpp", ".h", ".hpp", ".cu", ".cuh",
                 ".sh", ".cmake", ".in", ".yaml", ".yml", ".json"}
SKIP_DIRS = {"__pycache__", "build", ".venv", ".git", ".pytest_cache"}

_HEADING = re.compile(r"^#{2,3}\s+(\d+(?:\.\d+)?)\.?\s", re.M)
_ITEM = re.compile(r"^(\d+)\.\s", re.M)
_SEC = r"(\d+(?:\.\d+)?)"
# "§4.2", "§4.2–4.3", "§4.3–§4.4", "§15 #4", "§15 #10, #11"
_CITE = re.compile(r"§\s*" + _SEC + r"(?:\s*[–-]\s*§?\s*" + _SEC + r")?((?:\s*,?\s*#\d+)*)")
_ITEM_REF = re.compile(r"#(\d+)")
_MD_LINK = re.compile(r"\]\(([^)\s]+)\)")

# References to material that is not part of the repository (working notes, machine paths).
# This file spells the patterns out, so it is the one file the path scan leaves out.
_EXTERNAL = [
    (re.compile(r"(?<![\w.-])shared/"), "a path under shared/"),
    (re.compile(r"\bSPEC\.md\b"), "SPEC.md (the spec is docs/spec.md)"),
    (re.compile(r"\bDESIGN(?:\.md)?\s*§|\bDESIGN\.md\b"), "DESIGN.md"),
    (re.compile(r"\bANCHORS\b"), "ANCHORS"),
    (re.compile(r"\bVENDOR_APIS\b"), "VENDOR_APIS"),
    (re.compile(r"\bTOOLCHAIN(?:\.md)?\b"), "TOOLCHAIN"),
    (re.compile(r"(?<![\w.])/work/"), "an absolute /work/ path"),
]


def spec_sections(text: str) -> tuple[set[str], set[int]]:
    """Section numbers of the ``##``/``###`` headings, and the item numbers of the §15 list."""
    sections = set(_HEADING.findall(text))
    items: set[int] = set()
    m = re.search(r"^##\s+15\.\s.*$", text, re.M)
    if m:
        nxt = re.search(r"^##\s", text[m.end():], re.M)
        body = text[m.end(): m.end() + nxt.start()] if nxt else text[m.end():]
        items = {int(i) for i in _ITEM.findall(body)}
    return sections, items


def citations(text: str) -> list[tuple[int, str, list[str], list[int]]]:
    """``(line, citation text, sections, §15 items)`` for every ``§`` citation in ``text``."""
    out = []
    for m in _CITE.finditer(text):
        secs = [m.group(1)] + ([m.group(2)] if m.group(2) else [])
        items = [int(i) for i in _ITEM_REF.findall(m.group(3) or "")]
        out.append((text.count("\n", 0, m.start()) + 1, m.group(0).strip(), secs, items))
    return out


def unresolved(text: str, sections: set[str], items: set[int]) -> list[str]:
    bad = []
    for line, cite, secs, its in citations(text):
        missing = [s for s in secs if s not in sections]
        if its and secs[-1] != "15":
            missing.append("#-items outside §15")
        missing += [f"§15 #{i}" for i in its if i not in items]
        if missing:
            bad.append(f"line {line}: {cite!r} -> no {', '.join(missing)} in docs/spec.md")
    return bad


def external_refs(text: str) -> list[str]:
    bad = []
    for pat, what in _EXTERNAL:
        for m in pat.finditer(text):
            bad.append(f"line {text.count(chr(10), 0, m.start()) + 1}: {what} ({m.group(0)!r})")
    return bad


def scanned_files() -> list[Path]:
    files = [ROOT / f for f in SCAN_FILES if (ROOT / f).is_file()]
    for d in SCAN_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in TEXT_SUFFIXES and not SKIP_DIRS & set(p.relative_to(ROOT).parts) \
                    and not any(part.endswith(".egg-info") for part in p.parts):
                files.append(p)
    return files


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="module")
def spec_index() -> tuple[set[str], set[int]]:
    assert SPEC.is_file(), "docs/spec.md is missing"
    return spec_sections(_read(SPEC))


def test_spec_has_every_section(spec_index):
    sections, items = spec_index
    for top in range(16):
        assert str(top) in sections, f"docs/spec.md has no section {top}"
    assert items == set(range(1, max(items) + 1)) and len(items) >= 18, f"§15 items not numbered 1..n: {sorted(items)}"


def test_every_spec_citation_resolves(spec_index):
    sections, items = spec_index
    n, bad = 0, []
    for p in scanned_files():
        text = _read(p)
        n += len(citations(text))
        bad += [f"{p.relative_to(ROOT)} {b}" for b in unresolved(text, sections, items)]
    assert n > 300, f"only {n} citations found: is the scan looking at the right files?"
    assert not bad, "unresolved SPEC citations:\n" + "\n".join(bad)


def test_no_reference_outside_the_repository():
    me = Path(__file__).resolve()
    bad = []
    for p in scanned_files():
        if p.resolve() == me:
            continue
        bad += [f"{p.relative_to(ROOT)} {b}" for b in external_refs(_read(p))]
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


def test_relative_markdown_links_resolve():
    bad = []
    for p in scanned_files():
        if p.suffix != ".md":
            continue
        for m in _MD_LINK.finditer(_read(p)):
            target = m.group(1).split("#", 1)[0]
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            if not (p.parent / target).exists():
                bad.append(f"{p.relative_to(ROOT)}: link to {m.group(1)}")
    assert not bad, "broken relative links:\n" + "\n".join(bad)


# The checkers themselves must be able to fail. The bogus citations are assembled at run time so
# that this file does not contain them literally (it is scanned too).
S = "§"


@pytest.mark.parametrize("bogus", [
    f"see SPEC {S}99.9", f"SPEC {S}4.99", f"({S}16)", f"{S}15 #99", f"{S}15 #4, #77", f"{S}4.2–4.99",
    f"{S}4.2–{S}31.1", f"{S}6.3 #2",
])
def test_checker_catches_bogus_citation(spec_index, bogus):
    sections, items = spec_index
    assert len(unresolved(f"a line\nsome text {bogus} more\n", sections, items)) == 1


@pytest.mark.parametrize("good", [
    f"SPEC {S}9.2", f"{S}4.2–4.3", f"{S}4.3–{S}4.4", f"{S}15 #10, #11", f"{S}1", f"SPEC {S}15 #18.", f"{S}10.1–10.5)",
])
def test_checker_accepts_real_citation(spec_index, good):
    sections, items = spec_index
    assert citations(good) and not unresolved(good, sections, items)


@pytest.mark.parametrize("text", [
    "see " + "shared" + "/SPEC.md", "(" + "DESIGN" + " §4)", "ANCH" + "ORS " + S + "5.9", "VENDOR" + "_APIS", "TOOL" + "CHAIN.md",
    "/" + "work/main/x",
])
def test_checker_catches_external_reference(text):
    assert external_refs(text)


def test_checker_leaves_ordinary_words_alone():
    assert not external_refs("shared_experts, the shared expert, docs/spec.md, a DESIGN choice, ./shared_mem")
