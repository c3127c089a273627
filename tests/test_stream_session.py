"""The tap's reading of streaming messages (tap/streaming.py Session), on a virtual clock: the
events no stand-in server sends in the end-to-end tests (tests/test_tap_streaming.py): a turn
ended by the server's VAD (speech_stopped), failed transcriptions and responses, error types,
and WhisperLive's ERROR status."""
from __future__ import annotations

import base64
import json

import pytest

from whisper_exporter.tap.streaming import OPENAI, OPENAI_RATES, WHISPERLIVE, Session, StreamStats

APPEND = json.dumps({"type": "input_audio_buffer.append",
                     "audio": base64.b64encode(b"\0" * OPENAI_RATES["pcm16"]).decode()})  # 1 s of pcm16


def event(kind: str, **fields) -> str:
    return json.dumps({"type": kind, **fields})


def observed(stats: StreamStats, name: str, protocol: str = OPENAI) -> tuple[int, float]:
    """(count, sum) of one of the session histograms."""
    hist = stats.hists.get((name, protocol))
    return (sum(hist.counts), hist.sum) if hist else (0, 0.0)


def realtime(stats: StreamStats, finals: list) -> Session:
    stats.on_final = lambda text, language, audio: finals.append((text, audio))
    session = Session(stats, "/v1/realtime", 0.0)
    session.server_message(event("session.created", session={}), 0.1)
    return session


def test_server_vad_speech_stopped_ends_the_turn_for_the_finalisation_lag():
    """With server VAD the client never commits: the turn ends when the server hears the speech
    stop, so the lag runs from speech_stopped (2.0 s), not from committed (2.3 s)."""
    stats, finals = StreamStats(), []
    session = realtime(stats, finals)
    session.client_message(APPEND, 0.5)
    session.client_message(APPEND, 1.5)
    session.server_message(event("input_audio_buffer.speech_started", audio_start_ms=0), 0.6)
    session.server_message(event("input_audio_buffer.speech_stopped", audio_end_ms=1900), 2.0)
    session.server_message(event("input_audio_buffer.committed", item_id="t1"), 2.3)
    session.server_message(event("conversation.item.input_audio_transcription.delta", item_id="t1",
                                 delta="Hello"), 2.5)
    session.server_message(event("conversation.item.input_audio_transcription.completed", item_id="t1",
                                 transcript="Hello there."), 2.8)
    assert observed(stats, "finalisation") == (1, pytest.approx(0.8))
    assert observed(stats, "first_partial") == (1, pytest.approx(2.0))  # 2.5 - first audio at 0.5
    assert stats.counters[("turns", OPENAI)] == 1
    assert finals == [("Hello there.", pytest.approx(2.0))]


def test_a_client_commit_before_speech_stopped_keeps_the_commit_as_the_turns_end():
    stats, finals = StreamStats(), []
    session = realtime(stats, finals)
    session.client_message(APPEND, 0.5)
    session.client_message(event("input_audio_buffer.commit"), 1.0)
    session.server_message(event("input_audio_buffer.speech_stopped"), 1.4)
    session.server_message(event("input_audio_buffer.committed", item_id="t1"), 1.5)
    session.server_message(event("conversation.item.input_audio_transcription.completed", item_id="t1",
                                 transcript="Hi."), 2.0)
    assert observed(stats, "finalisation") == (1, pytest.approx(1.0))


def test_a_failed_transcription_is_counted_and_its_turn_never_finalised():
    stats, finals = StreamStats(), []
    session = realtime(stats, finals)
    session.client_message(APPEND, 0.5)
    session.client_message(event("input_audio_buffer.commit"), 1.0)
    session.server_message(event("input_audio_buffer.committed", item_id="t1"), 1.1)
    session.server_message(event("conversation.item.input_audio_transcription.failed", item_id="t1",
                                 error={"type": "transcription_error", "message": "decoder"}), 1.5)
    # a late completed for the failed turn is not a finalisation of it
    session.server_message(event("conversation.item.input_audio_transcription.completed", item_id="t1",
                                 transcript="late"), 3.0)
    assert stats.errors == {(OPENAI, "transcription_failed"): 1}
    assert observed(stats, "finalisation") == (0, 0.0)
    assert finals == []
    # the next turn is measured as usual
    session.client_message(APPEND, 4.0)
    session.client_message(event("input_audio_buffer.commit"), 5.0)
    session.server_message(event("input_audio_buffer.committed", item_id="t2"), 5.1)
    session.server_message(event("conversation.item.input_audio_transcription.completed", item_id="t2",
                                 transcript="Next."), 5.4)
    assert observed(stats, "finalisation") == (1, pytest.approx(0.4))
    assert finals == [("Next.", pytest.approx(1.0))]


@pytest.mark.parametrize("response, counted", [
    ({"status": "failed", "status_details": {"type": "failed"}}, 1),
    ({"status": "completed"}, 0),
    ({"status": "cancelled"}, 0),
    ("failed", 0),  # not an object: not read
])
def test_a_failed_response_is_counted_as_response_failed(response, counted):
    stats = StreamStats()
    session = realtime(stats, [])
    session.server_message(event("response.done", response=response), 1.0)
    assert stats.errors.get((OPENAI, "response_failed"), 0) == counted
    assert sum(stats.errors.values()) == counted


def test_error_events_are_counted_by_their_type_and_unknown_types_as_other():
    stats = StreamStats()
    session = realtime(stats, [])
    for kind in ("invalid_request_error", "server_error", "rate_limit_error", "server_error",
                 "made_up_error", "x" * 200):
        session.server_message(event("error", error={"type": kind, "message": "m"}), 1.0)
    session.server_message(event("error", error="not an object"), 1.0)
    assert stats.errors == {(OPENAI, "invalid_request_error"): 1, (OPENAI, "server_error"): 2,
                            (OPENAI, "rate_limit_error"): 1, (OPENAI, "other"): 3}


def test_whisperlive_error_status_is_a_server_error_and_the_session_goes_on():
    stats, finals = StreamStats(), []
    stats.on_final = lambda text, language, audio: finals.append(text)
    session = Session(stats, "/", 0.0)
    session.client_message(json.dumps({"uid": "u1", "language": "en", "model": "tiny"}), 0.1)
    session.server_message(json.dumps({"uid": "u1", "message": "SERVER_READY", "backend": "faster_whisper"}), 0.4)
    session.client_message(b"\0" * 64000, 0.5)  # 1 s of float32 at 16 kHz
    session.server_message(json.dumps({"uid": "u1", "status": "ERROR", "message": "decoder hiccup"}), 0.9)
    session.server_message(json.dumps({"uid": "u1", "segments": [
        {"start": "0.000", "end": "0.800", "text": "Hello.", "completed": True}]}), 1.2)
    session.closed(1000, "client", 2.0)
    assert session.protocol == WHISPERLIVE
    assert stats.errors == {(WHISPERLIVE, "server_error"): 1}
    assert observed(stats, "ready", WHISPERLIVE) == (1, pytest.approx(0.3))
    assert observed(stats, "transcript_lag", WHISPERLIVE) == (1, pytest.approx(0.2))
    assert finals == ["Hello."]


def test_whisperlive_final_transcript_keeps_the_last_partial_after_the_completed_segments():
    """The real server closes after END_OF_AUDIO without completing its last segment (seen with
    WhisperLive 0.10.0, tests/test_whisperlive_real_server.py): the session's final transcript is
    the completed segments and the last partial after them, as the canary reads it. Before, the
    tail was lost, and a session with no completed segment was never checked."""
    for messages, want in (
        ([[("0.000", "1.0", "Hello.", True), ("1.0", "1.5", "How are", False)],
          [("0.000", "1.0", "Hello.", True), ("1.0", "2.0", "How are you?", False)]], ["Hello. How are you?"]),
        ([[("0.000", "1.0", "Only a partial", False)]], ["Only a partial"]),
        ([[("0.000", "1.0", "Done.", True)]], ["Done."]),
        ([[("0.000", "1.0", "Done.", True), ("1.0", "1.2", "", False)]], ["Done."]),
        ([[("0.000", "1.0", "", False)]], []),  # nothing written: nothing to check
    ):
        stats, finals = StreamStats(), []
        stats.on_final = lambda text, language, audio: finals.append(text)
        session = Session(stats, "/", 0.0)
        session.client_message(json.dumps({"uid": "u1", "language": "en", "model": "tiny"}), 0.1)
        session.server_message(json.dumps({"uid": "u1", "message": "SERVER_READY"}), 0.2)
        session.client_message(b"\0" * 64000, 0.3)
        for segments in messages:
            session.server_message(json.dumps({"uid": "u1", "segments": [
                {"start": a, "end": b, "text": text, "completed": done} for a, b, text, done in segments]}), 1.0)
        session.closed(1000, "server", 2.0)
        assert finals == want, messages
