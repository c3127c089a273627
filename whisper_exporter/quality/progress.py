"""Progress of a long evaluation on stderr: tqdm's live bar on a terminal, and plain lines when
stderr is a file or a pipe (CI logs), where a bar redrawn with carriage returns is unreadable."""
from __future__ import annotations

import math
import time
from typing import IO, Any

from tqdm import tqdm

# Without a terminal: a line every tenth of the run, and at least one every 30 s.
LINE_FRACTION = 0.1
LINE_SECONDS = 30.0
_LINE = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


class Progress:
    """Called after each utterance as progress(n, total, result); close() when done."""

    def __init__(self, total: int, stream: IO[str], tty: bool, desc: str = "evaluate"):
        self.total, self.stream, self.desc = total, stream, desc
        self.started = self.last = time.monotonic()
        self.step = max(1, math.ceil(total * LINE_FRACTION))
        self.bar = tqdm(total=total, file=stream, desc=desc, unit="utt", dynamic_ncols=True) if tty else None

    def __call__(self, n: int, total: int, result: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(str(getattr(result, "id", ""))[:30], refresh=False)
            self.bar.update(n - self.bar.n)
            return
        now = time.monotonic()
        if n == total or n % self.step == 0 or now - self.last >= LINE_SECONDS:
            self.last = now
            line = tqdm.format_meter(n, total, now - self.started, prefix=self.desc, unit="utt", bar_format=_LINE)
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
