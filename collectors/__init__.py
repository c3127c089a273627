"""Bundled collectors: importing this package registers each one by name."""
from collectors import gpu, logs, probe, process, quality, tap  # noqa: F401
