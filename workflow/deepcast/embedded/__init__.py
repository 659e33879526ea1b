"""The embedded tiny DeepSeek-V3 checkpoint and the script that trained it."""
