"""The repository explains itself: no tracked file points at a document outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BINARY = {".safetensors", ".png", ".gif", ".mp4", ".parquet", ".db"}
# A relative path to a document that climbs out of its folder, or an absolute path into
# the workstation this was written on (cluster paths such as /home/ray/dcm or /mnt/dcm are
# fine, and so is a path-traversal string a test feeds to the job store).
ESCAPE = re.compile(
    r"(?<![\w.])(?:\.\./)+[\w.-][\w./-]*\.(?:md|rst|txt|pdf|html)\b|(?<![\w.])/work/[\w./-]+"
)
# A named document (METHOD.md, docs/RUNTIME.md, ...): upper-case stems are our documents.
DOCUMENT = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[A-Z][A-Z_]+\.md)\b")


def _tracked_text_files() -> dict[str, str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    texts = {}
    for rel in filter(None, out):
        path = ROOT / rel
        if path.suffix in BINARY or rel.startswith("tests/data/") or not path.is_file():
            continue
        try:
            texts[rel] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def _outside(rel: str, ref: str) -> bool:
    if ref.startswith("/"):
        return True
    # Docs write paths from the repository root, code comments from their own folder.
    bases = (ROOT, (ROOT / rel).parent)
    return any(not (base / ref).resolve().is_relative_to(ROOT) for base in bases)


def test_no_file_cites_a_document_outside_the_repository():
    texts = _tracked_text_files()
    assert "docs/METHOD.md" in texts, "the maths notes must live in docs/"
    bad = [
        f"{rel}: {ref}"
        for rel, text in texts.items()
        for ref in ESCAPE.findall(text)
        if _outside(rel, ref)
    ]
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


def test_every_cited_document_exists_in_the_repository():
    texts = _tracked_text_files()
    names = {Path(rel).name for rel in texts} | {rel for rel in texts}
    missing = sorted(
        f"{rel}: {doc}"
        for rel, text in texts.items()
        for doc in DOCUMENT.findall(text)
        if doc not in names and Path(doc).name not in names
    )
    assert not missing, "documents cited but not in the repository:\n" + "\n".join(missing)


def test_every_cited_experiment_config_exists():
    texts = _tracked_text_files()
    missing = sorted(
        f"{rel}: {ref}"
        for rel, text in texts.items()
        for ref in re.findall(r"pipelines/configs/[\w.-]+\.yaml", text)
        if not (ROOT / ref).is_file()
    )
    assert not missing, "configs cited but not in pipelines/configs/:\n" + "\n".join(missing)
