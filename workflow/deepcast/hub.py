"""Where the model hub is and who we are there, read at call time from the environment."""

from __future__ import annotations

import os


def endpoint() -> str:
    """HF_ENDPOINT if set (a mirror, or the loopback server in tests), else the public hub."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def token() -> str | bool:
    """HF_TOKEN from the environment, else the token `hf auth login` stored for this user (huggingface_hub's
    own file, which deepcast never writes); False sends no token. On a cluster the stored token stays off the
    jobs' exported environment (docs/reliability.md, secrets)."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token() or False
