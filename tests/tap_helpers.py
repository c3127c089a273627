"""Helpers for the tap tests: an aiohttp upstream of our own in a thread, a tap, its records."""
from __future__ import annotations

import asyncio
import struct
import threading
import time
from pathlib import Path
from typing import Awaitable, Callable, Optional

from aiohttp import web

from whisper_exporter.tap import TapConfig, TapRecord
from whisper_exporter.tap.proxy import Tap

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Upstream:
    """An aiohttp server on a free loopback port, in its own thread and loop."""

    def __init__(self, routes: dict[str, Handler]):
        self.routes = routes
        self.loop = asyncio.new_event_loop()
        self.port: Optional[int] = None
        self._runner: Optional[web.AppRunner] = None
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            app = web.Application(client_max_size=1 << 34)
            for path, handler in routes.items():
                app.router.add_route("*", path, handler)
            self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self._runner.cleanup())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Records:
    """The on_record callback: keeps every record; wait(n) until n have come."""

    def __init__(self) -> None:
        self.items: list[TapRecord] = []
        self.cond = threading.Condition()

    def __call__(self, record: TapRecord) -> None:
        with self.cond:
            self.items.append(record)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 60.0) -> list[TapRecord]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.items) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(self.items)} of {n} records came: {self.items}"
                self.cond.wait(left)
            return list(self.items)


def start_tap(upstream: str, records: Callable[[TapRecord], None], wants_audio=None, **options) -> Tap:
    """A started tap on a free loopback port in front of `upstream`."""
    tap = Tap(TapConfig(enabled=True, listen="127.0.0.1:0", **options), upstream, records, wants_audio=wants_audio)
    tap.start()
    return tap


def write_wav(path: Path, seconds: float, rate: int = 16000, chunk_frames: int = 1 << 20) -> Path:
    """A silent 16-bit mono WAV of `seconds`, written in chunks (big files stay off the heap)."""
    import wave

    frames = int(seconds * rate)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        zeros = b"\0\0" * chunk_frames
        left = frames
        while left > 0:
            n = min(left, chunk_frames)
            w.writeframes(zeros[: 2 * n])
            left -= n
    return path


def multipart(boundary: str, fields: dict[str, str], file_field: str, filename: str, data: bytes) -> bytes:
    """A multipart/form-data body, written out here so tests can cut and break it on purpose."""
    out = b""
    for name, value in fields.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{file_field}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    frames = int(seconds * rate)
    data = b"\0\0" * frames
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", len(data))
    return header + data
