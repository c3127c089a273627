"""Bundled collectors: importing this package registers each one by name."""
from collectors import gpu, process  # noqa: F401
