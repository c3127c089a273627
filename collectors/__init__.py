"""Bundled collectors, installed as `whisper_exporter.collectors`: one module each, found through
the `whisper_exporter.collectors` entry-point group like any third-party plugin (docs/plugins.md)."""
