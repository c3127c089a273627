"""whisper-exporter: a Prometheus exporter that watches a Whisper speech-recognition server."""
__version__ = "0.1.0"
