"""deepcast: DeepSeek checkpoints to validated, deployable artifacts per hardware target."""

__version__ = "0.1.0"
