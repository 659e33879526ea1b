"""Where artifacts live, in one place: work shared by every target under the model's revision, work
that depends on the target under the target. The rules, `deepcast report` and `deepcast rebuild` all
read the layout from here."""

from __future__ import annotations

from deepcast.registry import ModelRef


def model_dir(model: ModelRef) -> str:
    return f"results/models/{model.name}/{model.path_revision}"


def target_dir(target: str, model: ModelRef) -> str:
    return f"results/targets/{target}/{model.name}/{model.path_revision}"


def alternatives(names: list[str]) -> str:
    """A wildcard constraint matching exactly these names."""
    import re

    return "|".join(re.escape(name) for name in dict.fromkeys(names))
