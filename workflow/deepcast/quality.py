"""Expected quality loss per format, read from config/quality.yaml (published anchors, each with its source)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from pydantic import Field

from deepcast.compatibility import DEFAULT_CONFIG_DIR
from deepcast.errors import DeepcastError
from deepcast.registry import Strict, _load_yaml


class Anchor(Strict):
    loss_pct: float = Field(ge=0, description="Perplexity increase over the 16-bit model, in percent.")
    kld: float | None = Field(default=None, ge=0, description="KL divergence from the 16-bit model, where published.")
    source: str


class RequantizeCost(Strict):
    """What making a type from a Q8_0 base costs against making it from the 16-bit base (the disk-lean route)."""

    kld_increase_pct: float = Field(description="Mean KL divergence from the 16-bit model, relative increase.")
    worst_type: str
    worst_kld_increase_pct: float
    source: str


class Losses(Strict):
    sources: dict[str, str]
    formats: dict[str, Anchor]
    requantize_from_q8_0: RequantizeCost

    def expected(self, fmt: str) -> tuple[float, str]:
        """(loss in percent, where the figure comes from) for a format the planner offers."""
        anchor = self.formats.get(fmt)
        if anchor is None:
            raise DeepcastError(f"config/quality.yaml has no expected loss for {fmt}. Fix: add it with its source.")
        return anchor.loss_pct, anchor.source


@cache
def load(config_dir: Path = DEFAULT_CONFIG_DIR) -> Losses:
    return _load_yaml(config_dir / "quality.yaml", Losses)
