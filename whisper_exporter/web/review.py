"""The review page (/review): a person verifies sampled production transcripts.

GET /review lists the pending items of the review queue (oldest first, filtered by ?language=)
and shows one: its audio (GET /review/audio/<id>, by item id only), the server's transcript to
correct, its language, and submit, skip and the four flags. POST /review/submit appends one
verified record through sampling.append_reference; the quality collector scores it at its next
run. Skips write nothing: the page shows that reviewer the next item.

Production audio and what users said are personal data (SECURITY.md): the page and its audio are
served only when the web config requires authentication (basic auth users, or a client certificate
the TLS handshake requires), and otherwise answer 403 naming those keys. A POST needs a token bound
to the user and the item (an HMAC with a per-process key; its issue time gives the time spent) and
must not come from another origin (Origin, Sec-Fetch-Site). The log names users, items, languages
and flags, never text.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from html import escape
from typing import Any, Callable, Iterable, Optional, Protocol
from urllib.parse import parse_qs, quote, urlencode

from whisper_exporter.config import Config, config_dir, resolve_path
from whisper_exporter.quality.flags import FLAGS
from whisper_exporter.runtime.scheduler import Scheduler
from whisper_exporter.web.connections import FileBody
from whisper_exporter.whisper.languages import WHISPER_LANGUAGES, language_code

log = logging.getLogger("whisper_exporter.web.review")

PREFIX = "/review"
ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the queue's ids (sampling.item_id: 16 hex digits); never a path
TOKEN_TTL = 12 * 3600.0  # seconds a page's token stays valid
MAX_REFERENCE = 20000  # characters of a corrected transcript
MAX_LISTED = 200  # pending items listed on the page
MAX_USERS = 1000  # reviewers whose skips are remembered
MAX_SKIPS = 10000  # skipped ids remembered per reviewer
FLAG_NAMES = {"no_speech": "no speech", "unintelligible": "unintelligible", "wrong_language": "wrong language",
              "personal_data": "contains personal data"}
OFF_AUTH = ("The review page is off: production audio and transcripts are personal data, served only behind "
            "authentication. In --web.config.file set basic_auth_users, or tls_server_config.client_auth_type: "
            "RequireAndVerifyClientCert (with client_ca_file).\n")
OFF_CONFIG = ("The review page is off: it needs collectors.quality.production.queue and "
              "collectors.quality.production.references in the configuration.\n")
# Audio by its first bytes (the tap keeps uploads under the client's suffix, which may be anything).
_MAGIC = ((b"RIFF", 0, "audio/wav"), (b"fLaC", 0, "audio/flac"), (b"OggS", 0, "audio/ogg"),
          (b"ID3", 0, "audio/mpeg"), (b"\x1a\x45\xdf\xa3", 0, "audio/webm"), (b"ftyp", 4, "audio/mp4"),
          (b"#!AMR", 0, "audio/amr"))

StartResponse = Callable[..., object]


class Current(Protocol):
    config: Config
    scheduler: Scheduler


def content_type(path: str) -> str:
    """The audio's media type from its first bytes; application/octet-stream when unknown."""
    with open(path, "rb") as f:
        head = f.read(12)
    for magic, offset, kind in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return kind
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "audio/mpeg"  # an MPEG frame sync
    return "application/octet-stream"


class ReviewPage:
    """The WSGI app for everything under /review (web/server.py hands those paths here)."""

    def __init__(self, current: Current, clock: Callable[[], float] = time.time):
        self.current = current
        self.clock = clock
        self._key = secrets.token_bytes(32)  # tokens die with the process: a restart needs a page reload
        self._lock = threading.Lock()
        self._skipped: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()  # user -> skipped ids

    # -- requests ---------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        shared = self.current.scheduler.shared
        production = getattr(getattr(self.current.config.collectors, "quality", None), "production", None)
        if shared is None or shared.review_queue is None or production is None or not production.references:
            return _text(start_response, "404 Not Found", OFF_CONFIG)
        user = environ.get("REMOTE_USER") or environ.get("SSL_CLIENT_S_DN_CN")
        if not shared.page_authenticated or not user:
            return _text(start_response, "403 Forbidden", OFF_AUTH)
        if path in (PREFIX, PREFIX + "/"):
            if method not in ("GET", "HEAD"):
                return _text(start_response, "405 Method Not Allowed", "Use GET.\n", [("Allow", "GET, HEAD")])
            return self._page(environ, start_response, user)
        if path.startswith(PREFIX + "/audio/"):
            if method not in ("GET", "HEAD"):
                return _text(start_response, "405 Method Not Allowed", "Use GET.\n", [("Allow", "GET, HEAD")])
            return self._audio(path[len(PREFIX + "/audio/"):], start_response)
        if path == PREFIX + "/submit":
            if method != "POST":
                return _text(start_response, "405 Method Not Allowed", "Use POST.\n", [("Allow", "POST")])
            return self._submit(environ, start_response, user)
        return _text(start_response, "404 Not Found", "Not found. The review page is /review.\n")

    def _references_path(self) -> str:
        config = self.current.config
        path = resolve_path(config.collectors.quality.production.references, config_dir(config.source))
        assert path is not None  # __call__ answers 404 without one
        return path

    def _pending(self) -> list[Any]:
        """Queue items without a verified record, oldest first."""
        from whisper_exporter.quality.sampling import load_references

        shared = self.current.scheduler.shared
        assert shared is not None and shared.review_queue is not None  # __call__ checked
        done, _problems = load_references(self._references_path())
        items = [q for q in shared.review_queue.items() if q.id not in done]
        return sorted(items, key=lambda q: (q.sampled_at, q.id))

    # -- tokens -----------------------------------------------------------------------------

    def token(self, user: str, ident: str, issued: Optional[float] = None) -> str:
        """A form's token: the issue time and an HMAC of user, item and time."""
        issued = int(self.clock() if issued is None else issued)
        mac = hmac.new(self._key, f"{user}\0{ident}\0{issued}".encode("utf-8", "surrogatepass"),
                       hashlib.sha256).hexdigest()
        return f"{issued}.{mac}"

    def _issued(self, token: str, user: str, ident: str) -> Optional[float]:
        """When a valid token for this user and item was issued, else None."""
        issued, _, _mac = token.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(token, self.token(user, ident, int(issued))):
            return None
        age = self.clock() - int(issued)
        return float(issued) if -60 <= age <= TOKEN_TTL else None

    # -- the page ---------------------------------------------------------------------------

    def _skips(self, user: str) -> OrderedDict[str, None]:
        with self._lock:
            skips = self._skipped.setdefault(user, OrderedDict())
            self._skipped.move_to_end(user)
            while len(self._skipped) > MAX_USERS:
                self._skipped.popitem(last=False)
            return skips

    def _page(self, environ: dict, start_response: StartResponse, user: str) -> Iterable[bytes]:
        query = parse_qs(environ.get("QUERY_STRING", ""), max_num_fields=10)
        wanted = (query.get("language") or [""])[0]
        language = language_code(wanted) or (wanted if wanted in ("unknown", "other") else "")
        chosen = (query.get("id") or [""])[0]
        pending = self._pending()
        by_language: dict[str, int] = {}
        for q in pending:
            by_language[q.language] = by_language.get(q.language, 0) + 1
        shown = [q for q in pending if not language or q.language == language]
        skips = self._skips(user)
        with self._lock:
            if not any(q.id not in skips for q in shown):
                skips.clear()  # every one skipped: start over
            current = next((q for q in shown if q.id == chosen), None) or \
                next((q for q in shown if q.id not in skips), None)
        nonce = secrets.token_urlsafe(16)
        body = _render(self, user, pending, shown, by_language, language, current, nonce).encode("utf-8", "replace")
        start_response("200 OK", [
            ("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "same-origin"),
            ("Content-Security-Policy", f"default-src 'none'; media-src 'self'; style-src 'nonce-{nonce}'; "
             f"script-src 'nonce-{nonce}'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")])
        return [body]

    # -- the audio --------------------------------------------------------------------------

    def _audio(self, ident: str, start_response: StartResponse) -> Iterable[bytes]:
        if not ID.fullmatch(ident):
            return _text(start_response, "400 Bad Request",
                         "An item id is 1 to 64 letters, digits, - or _ (audio is named by item id only).\n")
        shared = self.current.scheduler.shared
        assert shared is not None and shared.review_queue is not None  # __call__ checked
        item = next((q for q in shared.review_queue.items() if q.id == ident), None)
        if item is None:
            return _text(start_response, "404 Not Found", "No such item in the review queue.\n")
        try:
            st = os.lstat(item.audio)  # a link is not followed: the queue names a file, not where it points
            kind = content_type(item.audio) if stat.S_ISREG(st.st_mode) else None
        except OSError:
            kind = None
        if kind is None:
            return _text(start_response, "404 Not Found", "The audio of this item is gone (kept audio expires).\n")
        start_response("200 OK", [("Content-Type", kind), ("Cache-Control", "no-store"),
                                  ("X-Content-Type-Options", "nosniff"), ("Content-Disposition", "inline")])
        return FileBody(item.audio)

    # -- a review ---------------------------------------------------------------------------

    def _submit(self, environ: dict, start_response: StartResponse, user: str) -> Iterable[bytes]:
        refused = _cross_site(environ)
        if refused:
            log.warning("review: refused a POST from %s: %s", environ.get("REMOTE_ADDR", "?"), refused)
            return _text(start_response, "403 Forbidden", f"Refused: {refused}.\n")
        if environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            return _text(start_response, "415 Unsupported Media Type", "Send the page's form.\n")
        try:
            form = parse_qs(environ["wsgi.input"].read().decode("utf-8"), keep_blank_values=True,
                            max_num_fields=20, strict_parsing=False)
        except (UnicodeDecodeError, ValueError):
            return _text(start_response, "400 Bad Request", "The form is not UTF-8 or has too many fields.\n")

        def one(name: str) -> str:
            return (form.get(name) or [""])[0]

        ident = one("id")
        if not ID.fullmatch(ident):
            return _text(start_response, "400 Bad Request", "An item id is 1 to 64 letters, digits, - or _.\n")
        issued = self._issued(one("token"), user, ident)
        if issued is None:
            log.warning("review: refused a POST by %s for item %s: no valid token", user, ident)
            return _text(start_response, "403 Forbidden",
                         "Refused: the form's token is missing, wrong or expired (reload the page).\n")
        back = "../review" + ("?" + urlencode({"language": one("filter")}) if one("filter") else "")
        shared = self.current.scheduler.shared
        assert shared is not None and shared.review_queue is not None  # __call__ checked
        item = next((q for q in shared.review_queue.items() if q.id == ident), None)
        if item is None:
            return _text(start_response, "404 Not Found", "No such item in the review queue (scored already?).\n")
        action = one("action")
        if action == "skip":
            shared.reviews.skipped()
            skips = self._skips(user)
            with self._lock:
                skips[ident] = None
                while len(skips) > MAX_SKIPS:
                    skips.popitem(last=False)
            log.info("review: %s skipped item %s", user, ident)
            return _see_other(start_response, back)
        if action != "submit":
            return _text(start_response, "400 Bad Request", "action is submit or skip.\n")
        flags = form.get("flag") or []
        if any(f not in FLAGS for f in flags):
            return _text(start_response, "400 Bad Request", "flag is one of " + ", ".join(FLAGS) + ".\n")
        language = language_code(one("language")) if one("language") else None
        if language is None and (one("language") or not flags):
            return _text(start_response, "400 Bad Request", "language is a Whisper language code.\n")
        # Nothing was said on audio flagged no speech: the reference is empty, whatever the box held.
        reference = "" if "no_speech" in flags else " ".join(one("reference").split())
        if len(reference) > MAX_REFERENCE:
            return _text(start_response, "400 Bad Request", f"The transcript may have at most {MAX_REFERENCE} "
                         "characters.\n")
        if not reference and not flags:
            return _text(start_response, "400 Bad Request", "Type what was said, or flag the item.\n")
        now = self.clock()
        seconds = round(max(0.0, now - issued), 1)
        from whisper_exporter.quality.sampling import append_reference

        try:
            append_reference(self._references_path(), ident, reference, language, flags=flags, reviewer=user,
                             seconds=seconds, original=item.transcript, reviewed_at=round(now, 3), source="page")
        except OSError as err:
            log.warning("review: cannot write the references file (%s); item %s by %s not saved",
                        err.strerror or err, ident, user)
            return _text(start_response, "503 Service Unavailable",
                         f"Not saved: the references file cannot be written ({err.strerror or err}). "
                         "Nothing was written; submit again once it is fixed.\n")
        shared.reviews.mark_reviewed([ident])
        log.info("review: %s %s item %s (language %s%s, %.0f s)", user, "flagged" if flags else "verified", ident,
                 language, ", flags " + ",".join(flags) if flags else "", seconds)
        return _see_other(start_response, back)


def _cross_site(environ: dict) -> str:
    """Why a POST is refused as not same-origin, or "" (the browser's own Sec-Fetch-Site and
    Origin; a client that sends neither still needs the token)."""
    site = environ.get("HTTP_SEC_FETCH_SITE", "")
    if site and site not in ("same-origin", "none"):
        return f"a {site} request (Sec-Fetch-Site)"
    origin = environ.get("HTTP_ORIGIN", "")
    if origin:
        expected = f"{environ.get('wsgi.url_scheme', 'http')}://{environ.get('HTTP_HOST', '')}"
        if origin.lower() != expected.lower():
            return f"Origin {origin[:100]!r} is not this page's ({expected[:100]!r})"
    return ""


def _text(start_response: StartResponse, status: str, text: str,
          extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), *extra])
    return [body]


def _see_other(start_response: StartResponse, location: str) -> list[bytes]:
    start_response("303 See Other", [("Location", location), ("Content-Length", "0"), ("Cache-Control", "no-store")])
    return [b""]


def waited(seconds: float) -> str:
    """How long, in words: minutes under an hour, hours under two days, then days."""
    seconds = max(0.0, seconds)
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:70em}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}textarea{width:100%;font-size:1.1em}fieldset{margin:1em 0}
button{font-size:1em;margin-right:.5em;padding:.3em 1em}kbd{border:1px solid #aaa;border-radius:3px;padding:0 .3em}
.current{background:#ffd}
"""

_SCRIPT = """
const audio = document.getElementById('audio'), speed = document.getElementById('speed');
const form = document.getElementById('review');
function setSpeed(v) { v = Math.min(2, Math.max(0.5, v)); audio.playbackRate = v; speed.value = String(v); }
if (speed) { speed.addEventListener('change', () => setSpeed(parseFloat(speed.value))); }
document.addEventListener('keydown', (e) => {
  if (!form) return;
  if (e.ctrlKey && e.key === 'Enter') { e.preventDefault(); document.getElementById('submit').click(); return; }
  if (!e.altKey || e.ctrlKey || e.metaKey) return;
  const flags = {Digit1: 'no_speech', Digit2: 'unintelligible', Digit3: 'wrong_language', Digit4: 'personal_data'};
  let done = true;
  switch (e.code) {
    case 'KeyK': if (audio.paused) { audio.play(); } else { audio.pause(); } break;
    case 'KeyJ': audio.currentTime = Math.max(0, audio.currentTime - 5); break;
    case 'KeyL': audio.currentTime = audio.currentTime + 5; break;
    case 'Comma': setSpeed(audio.playbackRate - 0.25); break;
    case 'Period': setSpeed(audio.playbackRate + 0.25); break;
    case 'KeyN': document.getElementById('skip').click(); break;
    default:
      if (flags[e.code]) { const box = document.getElementById('flag-' + flags[e.code]); box.checked = !box.checked; }
      else { done = false; }
  }
  if (done) e.preventDefault();
});
"""


def _render(page: ReviewPage, user: str, pending: list[Any], shown: list[Any], by_language: dict[str, int],
            language: str, current: Any, nonce: str) -> str:
    now = page.clock()
    filters = [f'<a href="review">all ({len(pending)})</a>'] + [
        f'<a href="review?language={quote(lang)}">{escape(lang)} ({n})</a>' for lang, n in sorted(by_language.items())]
    parts = [f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Review - whisper-exporter</title>
<style nonce="{nonce}">{_STYLE}</style></head><body>
<h1>Review production transcripts</h1>
<p>Signed in as <b>{escape(user)}</b>. <b id="left">{len(shown)}</b> item{'' if len(shown) == 1 else 's'} left
{f'in language <b>{escape(language)}</b> ' if language else ''}({len(pending)} pending in all), oldest first.
Language: {' | '.join(filters)}.</p>
"""]
    if current is None:
        parts.append("<p id=\"done\">Nothing to review here.</p>")
    else:
        token = page.token(user, current.id)
        options = "".join(
            f'<option value="{code}"{" selected" if code == current.language else ""}>{code} ({escape(name)})</option>'
            for code, name in sorted(WHISPER_LANGUAGES.items()))
        if language_code(current.language) is None:
            options = f'<option value="" selected>{escape(current.language)} (choose)</option>' + options
        flags = "".join(f'<label><input type="checkbox" name="flag" value="{f}" id="flag-{f}"> {escape(name)} '
                        f'<kbd>Alt+{n}</kbd></label><br>' for n, (f, name) in enumerate(FLAG_NAMES.items(), 1))
        speeds = "".join(f'<option value="{v:g}"{" selected" if v == 1 else ""}>{v:g}x</option>'
                         for v in (0.5, 0.75, 1, 1.25, 1.5, 1.75, 2))
        duration = "" if current.duration is None else f", {current.duration:.1f} s"
        parts.append(f"""<h2>Item <code id="item">{escape(current.id)}</code></h2>
<p>Language {escape(current.language)}{duration}; sampled {waited(now - current.sampled_at)} ago.</p>
<p><audio id="audio" controls preload="metadata" src="review/audio/{quote(current.id)}"></audio>
<label>Speed <select id="speed">{speeds}</select></label></p>
<form id="review" method="post" action="review/submit">
<input type="hidden" name="id" value="{escape(current.id)}">
<input type="hidden" name="token" value="{escape(token)}">
<input type="hidden" name="filter" value="{escape(language)}">
<p><label for="reference">What was said (the server's transcript; correct it):</label><br>
<textarea id="reference" name="reference" rows="5">{escape(current.transcript)}</textarea></p>
<p><label>Language <select id="language" name="language">{options}</select></label></p>
<fieldset><legend>Flags (a flagged item is not scored; "no speech" on a transcript with text is a
confirmed hallucination)</legend>{flags}</fieldset>
<p><button id="submit" type="submit" name="action" value="submit">Submit <kbd>Ctrl+Enter</kbd></button>
<button id="skip" type="submit" name="action" value="skip">Skip <kbd>Alt+N</kbd></button></p>
</form>
<h3>Keyboard</h3>
<table id="shortcuts"><tr><th>keys</th><th>does</th></tr>
<tr><td><kbd>Alt+K</kbd></td><td>play / pause</td></tr>
<tr><td><kbd>Alt+J</kbd> / <kbd>Alt+L</kbd></td><td>back / forward 5 seconds</td></tr>
<tr><td><kbd>Alt+,</kbd> / <kbd>Alt+.</kbd></td><td>slower / faster (0.5x to 2x)</td></tr>
<tr><td><kbd>Alt+1</kbd> to <kbd>Alt+4</kbd></td><td>toggle a flag</td></tr>
<tr><td><kbd>Ctrl+Enter</kbd></td><td>submit</td></tr><tr><td><kbd>Alt+N</kbd></td><td>skip</td></tr></table>
<p>They work while typing in the transcript: none is a key that types text there.</p>
""")
    if shown:
        parts.append("<h3>Pending</h3><table id=\"queue\"><tr><th>item</th><th>language</th><th>duration</th>"
                     "<th>waiting</th></tr>")
        for q in shown[:MAX_LISTED]:
            css = ' class="current"' if current is not None and q.id == current.id else ""
            href = "review?" + urlencode({"id": q.id, **({"language": language} if language else {})})
            duration = "" if q.duration is None else f"{q.duration:.1f} s"
            parts.append(f'<tr{css}><td><a href="{escape(href)}">{escape(q.id)}</a></td><td>{escape(q.language)}'
                         f"</td><td>{duration}</td><td>{waited(now - q.sampled_at)}</td></tr>")
        parts.append("</table>")
        if len(shown) > MAX_LISTED:
            parts.append(f"<p>and {len(shown) - MAX_LISTED} more.</p>")
    parts.append(f'<script nonce="{nonce}">{_SCRIPT}</script></body></html>\n')
    return "".join(parts)
