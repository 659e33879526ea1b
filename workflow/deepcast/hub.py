"""Where the model hub is and who we are there, read at call time from the environment."""

from __future__ import annotations

import os


def endpoint() -> str:
    """HF_ENDPOINT if set (a mirror, or the loopback server in tests), else the public hub."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def token() -> str | bool:
    """HF_TOKEN from the environment, never from a file we write; False sends no token."""
    return os.environ.get("HF_TOKEN") or False
