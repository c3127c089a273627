"""What WhisperLive's server asks of torch on the CPU with its faster_whisper backend: only whether
CUDA is there (server.py, backend/faster_whisper_backend.py). The real torch wheel from PyPI pulls
about 3 GB of CUDA libraries, so tests/whisperlive_server.py puts this folder first on the server's
path instead. Its own VAD (whisper_live/vad.py) is the one part that computes with torch: the
clients here send use_vad false, as the exporter's canary does, and any other use fails loudly."""


class cuda:  # noqa: N801 - torch's own name
    @staticmethod
    def is_available() -> bool:
        return False


def __getattr__(name: str):
    raise AttributeError(f"torch.{name}: tests/whisperlive_shim stands in for torch's CUDA check only")
