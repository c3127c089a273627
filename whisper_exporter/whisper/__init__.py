"""Whisper domain code: clients, audio, scoring, languages, hallucination suspects (no prometheus_client)."""
