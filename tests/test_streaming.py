"""The streaming session's logic, with a scripted recogniser at the Transcribe seam."""

import asyncio
import sys
from dataclasses import replace

import numpy as np
import pytest

from pipeline.streaming.decoders import Linear16Decoder
from pipeline.streaming.session import StreamingSession, StreamOptions
from pipeline.core.types import SAMPLE_RATE, Segment, Transcript, Word

# What is "said": (word, start, end) in seconds; silence between 3.0 and 4.0.
SCRIPT = [(" One", 0.2, 0.6), (" two", 0.7, 1.1), (" three.", 1.2, 1.8), (" Four", 1.9, 2.4), (" five.", 2.5, 2.9),
          (" Six", 4.1, 4.5), (" seven.", 4.6, 5.2)]
SPEECH = [(0.2, 2.9), (4.1, 5.2)]


def make_session(**options):
    calls = []

    async def transcribe(audio, opts):
        # Recognise the scripted words that lie wholly inside this buffer, in its own time; the
        # word at the live edge is heard as a different word until it is complete. The audio ends
        # at the live edge (it may start before the utterance: left context).
        end = session.offset_s + len(session.buffer) / SAMPLE_RATE
        start = end - audio.duration_s
        calls.append((round(start, 2), round(end, 2), opts.beam_size))
        words = []
        for text, s, e in SCRIPT:
            if s >= start - 0.01 and e <= end:
                words.append(Word(text, s - start, e - start, 0.9))
            elif s >= start and s < end:
                words.append(Word(" uh", s - start, end - start, 0.3))
        return Transcript((Segment("".join(w.text for w in words), 0, audio.duration_s, -0.1, len(words), tuple(words)),),
                          "en", 0.99, audio.duration_s)

    session = StreamingSession(transcribe, StreamOptions(**options), vad=scripted_vad)
    return session, calls


def scripted_vad(samples):
    """Speech is wherever the scripted audio is not zero."""
    nonzero = np.flatnonzero(samples)
    if not len(nonzero):
        return []
    return [(int(nonzero[0]), int(nonzero[-1]) + 1)]


def audio_for(t0, t1):
    n = int(round((t1 - t0) * SAMPLE_RATE))
    t = t0 + np.arange(n) / SAMPLE_RATE
    speaking = np.zeros(n, dtype=bool)
    for s, e in SPEECH:
        speaking |= (t >= s) & (t < e)
    return np.where(speaking, 0.1, 0.0).astype(np.float32)


def run(session, total_s=6.0, chunk_s=0.1, behind_until_s=0.0):
    async def go():
        events = []
        t = 0.0
        while t < total_s - 1e-9:
            events += await session.feed(audio_for(t, t + chunk_s), behind=t + chunk_s < behind_until_s - 1e-9)
            t += chunk_s
        events += await session.finish()
        return events

    return asyncio.run(go())


def test_finals_are_never_rewritten_and_cover_every_word_once():
    session, calls = make_session(interim_every_s=0.5, endpointing_ms=400)
    events = run(session)
    finals = [e for e in events if e["is_final"]]
    said = " ".join(e["text"] for e in finals if e["text"]).split()
    assert said == ["One", "two", "three.", "Four", "five.", "Six", "seven."]
    starts = [w["start"] for e in finals for w in e["words"] if w["word"] not in ".,"]
    assert starts == sorted(starts)
    # Interim results came first, and the live-edge guess (" uh") never became final.
    assert any(not e["is_final"] for e in events)
    assert all("uh" not in e["text"] for e in finals)
    # The pause ended the first utterance: one speech_final for each.
    assert sum(e["speech_final"] for e in events) == 2
    # Interims decode greedily; so does the final decode, by default, for latency.
    assert {beam for *_, beam in calls} == {1}


@pytest.mark.parametrize("context_s", [0.0, 10.0])
def test_each_decode_hears_the_stream_s_previous_audio_before_the_utterance(context_s):
    # Whisper drops words of a short utterance heard alone ("Ever failed" -> "Everfair old"):
    # decodes start with the stream's previous audio, and only the utterance's words come out.
    # (Interims here hear as much as finals: their own shorter context is tested below.)
    session, calls = make_session(interim_every_s=0.5, endpointing_ms=400, context_s=context_s,
                                  interim_context_s=context_s)
    events = run(session)
    said = " ".join(e["text"] for e in events if e["is_final"] and e["text"]).split()
    assert said == ["One", "two", "three.", "Four", "five.", "Six", "seven."]
    second = [(start, end) for start, end, _ in calls if start >= 3.0 or end > 4.1]
    assert second
    if context_s:  # the first utterance (from 0 s) comes with every decode of the second
        assert all(start <= 0.2 and end - start <= context_s for start, end in second)
    else:
        assert all(start >= 3.5 for start, _ in second)


def recording(session, what) -> list:
    """``what(audio, opts)`` of each decode of ``session``, in call order, taken as the decode is
    asked for (beside make_session's calls)."""
    seen, inner = [], session.transcribe

    async def transcribe(audio, opts):
        seen.append(what(audio, opts))
        return await inner(audio, opts)

    session.transcribe = transcribe
    return seen


def recording_kinds(session) -> list[bool]:
    """Whether each decode of ``session`` is an interim, in call order."""
    return recording(session, lambda audio, opts: opts.interim)


def test_each_decode_says_where_its_utterance_starts_after_the_context():
    # The engine's own VAD cuts silence out of the context but never any of the utterance, which
    # the stream's VAD found to be speech.
    session, _ = make_session(interim_every_s=0.5, endpointing_ms=400, context_s=10.0)
    seen = recording(session, lambda audio, opts: (
        opts.speech_from_s, audio.duration_s - opts.speech_from_s, len(session.buffer) / SAMPLE_RATE))
    run(session)
    assert seen and all(utterance == pytest.approx(buffered) for _, utterance, buffered in seen)
    assert any(start > 3.0 for start, _, _ in seen)  # the second utterance's decodes hear the first


@pytest.mark.parametrize(("early_final_ms", "delay_s"), [(None, 0.1), (200, 0.2), (300, 0.2)])
def test_the_final_decode_starts_early_in_the_pause_and_the_endpoint_uses_it(early_final_ms, delay_s):
    # Speech ends at 2.9 s and 5.2 s; the endpoint comes after 400 ms of silence. The final's
    # decode is sent after early_final_ms of it (100 ms by default; at most half the endpointing):
    # what follows the speech is silence; not at the endpoint.
    options = {} if early_final_ms is None else {"early_final_ms": early_final_ms}
    session, calls = make_session(interim_every_s=0.5, endpointing_ms=400, **options)
    kinds = recording_kinds(session)
    events = run(session)
    finals = [end for (_, end, _), interim in zip(calls, kinds, strict=True) if not interim]
    assert len(finals) == 2  # one decode per utterance's final, none made again at the endpoint
    # By the first VAD check (every 0.1 s) that sees that much silence: the second utterance's end
    # falls a sample after a check (its chunks' times are sums of 0.1 s floats), so up to 0.1 s later.
    assert finals[0] == pytest.approx(2.9 + delay_s, abs=0.011)
    assert delay_s - 1e-6 <= finals[1] - 5.2 < delay_s + 0.11
    said = " ".join(e["text"] for e in events if e["is_final"] and e["text"]).split()
    assert said == ["One", "two", "three.", "Four", "five.", "Six", "seven."]
    assert sum(e["speech_final"] for e in events) == 2


@pytest.mark.parametrize("unstable_tail_s", [3.0, 1.0])
def test_an_interim_hears_less_context_until_its_words_may_become_final(unstable_tail_s):
    # Each decode is a step of the decoder per word of its window: an utterance's first interims
    # hear interim_context_s before it, not all of context_s. Once the utterance is longer than
    # unstable_tail_s (its words may become final where two hypotheses agree), they hear context_s.
    session, calls = make_session(interim_every_s=0.5, endpointing_ms=400, context_s=10.0, interim_context_s=2.0,
                                  unstable_tail_s=unstable_tail_s)
    kinds = recording_kinds(session)
    events = run(session)
    said = " ".join(e["text"] for e in events if e["is_final"] and e["text"]).split()
    assert said == ["One", "two", "three.", "Four", "five.", "Six", "seven."]
    # The second utterance's buffer starts at 3.6 s (0.5 s before its speech).
    second = [(start, end, interim) for (start, end, _), interim in zip(calls, kinds, strict=True) if end > 4.1]
    interims = [(start, end) for start, end, interim in second if interim]
    assert interims and [final for *_, final in second].count(False) == 1
    assert all(start <= 0.2 for start, _, interim in second if not interim)  # a final hears context_s
    for start, end in interims:
        if end - 3.6 < unstable_tail_s - 1e-6:
            assert start == pytest.approx(min(3.6, end - 2.0), abs=0.011)  # 2 s in all
        else:
            assert start <= 0.2
    assert any(end - 3.6 >= unstable_tail_s for _, end in interims) == (unstable_tail_s < 1.6)


def test_an_early_final_decode_is_dropped_when_the_speaker_goes_on():
    # A pause of 1.2 s (2.9 -> 4.1 s) is past early_final_ms: a final decode starts, then speech
    # comes again before the 1.6 s endpointing. That decode lacks "Six seven." and must not be the final.
    session, calls = make_session(interim_every_s=0.5, endpointing_ms=1600)
    kinds = recording_kinds(session)
    events = run(session)
    finals = [end for (_, end, _), interim in zip(calls, kinds, strict=True) if not interim]
    assert len(finals) == 2 and 2.9 + 0.09 <= finals[0] < 4.1 and finals[1] >= 5.2
    said = " ".join(e["text"] for e in events if e["is_final"] and e["text"]).split()
    assert said == ["One", "two", "three.", "Four", "five.", "Six", "seven."]
    [ended] = [e for e in events if e["speech_final"]]
    assert ended["text"].endswith("Six seven.")


# A fragment cut off by a hesitation (0.5 s of speech, a 0.5 s pause), then the phrase it begins.
FRAGMENT_SCRIPT = [(" Than", 0.2, 0.4), (" the", 0.45, 0.7), (" acoustic", 1.2, 1.7), (" corpus.", 1.75, 2.4)]
FRAGMENT_SPEECH = [(0.2, 0.7), (1.2, 2.4)]


@pytest.mark.parametrize(
    ("options", "said"),
    [
        # The default: a pause after under fragment_s of speech ends the utterance only once it
        # reaches fragment_endpointing_ms, so the fragment is decoded with the speech after it.
        ({}, [("Than the acoustic corpus.", True)]),
        # An endpoint the client gives ends every utterance, a fragment too (the server passes 0).
        ({"fragment_endpointing_ms": 0}, [("Than the", True), ("acoustic corpus.", True)]),
    ],
)
def test_a_fragment_ends_its_utterance_only_after_a_longer_pause(monkeypatch, options, said):
    monkeypatch.setattr(sys.modules[__name__], "SCRIPT", FRAGMENT_SCRIPT)
    monkeypatch.setattr(sys.modules[__name__], "SPEECH", FRAGMENT_SPEECH)
    session, _ = make_session(endpointing_ms=300, **options)
    events = run(session, total_s=4.0)
    assert [(e["text"], e["speech_final"]) for e in events if e["is_final"] and e["text"]] == said


def test_a_fragment_that_is_all_there_is_ends_after_the_longer_pause(monkeypatch):
    # "Than the" and then silence: the utterance ends once the pause reaches
    # fragment_endpointing_ms (800 ms after 0.7 s), not endpointing_ms, with the decode that
    # started 100 ms into it.
    monkeypatch.setattr(sys.modules[__name__], "SCRIPT", FRAGMENT_SCRIPT[:2])
    monkeypatch.setattr(sys.modules[__name__], "SPEECH", FRAGMENT_SPEECH[:1])
    session, _ = make_session(endpointing_ms=300)
    assert (session.options.fragment_s, session.options.fragment_endpointing_ms) == (1.0, 800)
    kinds = recording_kinds(session)

    async def go():
        for k in range(30):
            for event in await session.feed(audio_for(k / 10, (k + 1) / 10)):
                if event["speech_final"]:
                    return (k + 1) / 10, event["text"]
        return None

    assert asyncio.run(go()) == (pytest.approx(0.7 + 0.8), "Than the")
    assert kinds.count(False) == 1


def test_a_stream_that_ends_without_finish_cancels_its_early_final_decode():
    # The client hangs up in the pause: the final decode already sent is not needed any more.
    cancelled = []

    async def transcribe(audio, opts):
        try:
            await asyncio.Event().wait()  # a decode still running
        except asyncio.CancelledError:
            cancelled.append(opts.interim)
            raise

    session = StreamingSession(transcribe, StreamOptions(endpointing_ms=400, first_interim_s=60), vad=scripted_vad)

    async def go():
        for k in range(32):  # to 3.2 s: speech ended at 2.9 s, 300 ms of silence
            assert await session.feed(audio_for(k / 10, (k + 1) / 10)) == []
        await asyncio.sleep(0)
        assert cancelled == []  # sent, and running
        session.close()
        await asyncio.sleep(0)
        return list(cancelled)  # before asyncio.run cancels what is left

    assert asyncio.run(go()) == [False]


def test_a_session_that_is_behind_skips_interims_and_finalises_once_it_has_caught_up():
    # A stream whose audio waits (the server is behind) must not fall further behind: no interim
    # of outdated audio, and the utterances that ended meanwhile are finalised in one decode.
    session, calls = make_session(interim_every_s=0.5, endpointing_ms=400)
    events = run(session, behind_until_s=6.0)
    assert len(calls) == 1 and calls[0][1] == pytest.approx(6.0)
    assert [e["is_final"] and e["speech_final"] for e in events] == [True]
    assert events[0]["text"] == "One two three. Four five. Six seven."


def test_an_utterance_that_ends_while_the_session_is_behind_is_finalised_alone_once_it_catches_up():
    # The pause (2.9 -> 4.1 s) reaches the 400 ms endpoint while audio waits (a decode held the
    # session); it catches up at 4.5 s, in the next utterance. The first utterance is finalised
    # then, alone, up to its endpoint (one decode); the second goes on as an utterance of its own,
    # instead of both waiting for the second's end in one final.
    session, calls = make_session(interim_every_s=0.5, endpointing_ms=400)
    kinds = recording_kinds(session)
    events = run(session, behind_until_s=4.5)
    assert not kinds[0] and calls[0][1] == pytest.approx(2.9 + 0.4)
    finals = [e for e in events if e["is_final"]]
    assert [(e["text"], e["speech_final"]) for e in finals] == [("One two three. Four five.", True), ("Six seven.", True)]
    assert finals[0]["start"] + finals[0]["duration"] < 4.1 <= finals[1]["start"]


def test_the_first_interim_comes_after_first_interim_s_of_speech_and_again_until_it_hears_words():
    # Speech starts at 0.2 s (the buffer holds silence before it). The first interim comes after
    # 0.3 s of speech; one that hears nothing is followed 0.3 s later, not interim_every_s later.
    session, calls = make_session(first_interim_s=0.3, interim_every_s=1.5, endpointing_ms=400)
    inner = session.transcribe

    async def deaf_at_first(audio, opts):  # hears nothing in audio that ends before 1 s
        heard = await inner(audio, opts)
        return heard if calls[-1][1] >= 1.0 else Transcript((), "en", 0.99, audio.duration_s)

    session.transcribe = deaf_at_first
    run(session, total_s=2.8)
    assert [end for _, end, _ in calls[:4]] == pytest.approx([0.5, 0.8, 1.1, 2.6])


@pytest.mark.parametrize("final_probability", [0.57, 0.3])
def test_the_stream_s_language_comes_from_a_final_sure_of_it_not_from_an_interim(final_probability):
    """Regression: the first decode with words set the stream's language for good, and that is an
    interim that heard half a second of speech: a French sentence (espeak-ng) streamed without a
    language came out in Japanese to the end. Whisper base detected its first 0.5-1 s as Chinese
    (0.46-0.50) and the whole sentence as French (0.53-0.57)."""
    session, _ = make_session(first_interim_s=0.3, endpointing_ms=400)
    inner = session.transcribe
    asked = []  # (interim, the language the decode was given)

    async def detecting(audio, opts):
        asked.append((opts.interim, opts.language))
        heard = await inner(audio, opts)
        if opts.language:
            return replace(heard, language=opts.language, language_probability=1.0)
        language, probability = ("zh", 0.46) if opts.interim else ("fr", final_probability)
        return replace(heard, language=language, language_probability=probability)

    session.transcribe = detecting
    results = [e for e in run(session) if e["type"] == "Results" and e["words"]]
    first_final = next(i for i, (interim, _) in enumerate(asked) if not interim)
    assert first_final > 0 and len(asked) > first_final + 1  # interims before it, decodes after it
    assert all(language is None for _, language in asked[: first_final + 1])
    if final_probability >= 0.5:
        assert session.language == session.language_now == "fr"
        assert all(language == "fr" for _, language in asked[first_final + 1:])
    else:  # not sure enough: every decode detects again
        assert session.language is None and session.language_now in ("zh", "fr")
        assert all(language is None for _, language in asked)
    # Each result says what its decode heard until the language is known.
    assert results[0]["language"] == "zh" and not results[0]["is_final"]
    assert {r["language"] for r in results if r["is_final"]} == {"fr"}


def test_words_whisper_adds_past_the_end_of_the_audio_never_reach_a_result():
    # On a decode that ends soon after the speech, Whisper can run on past the audio, repeating
    # what it heard, every such word timed at the very end (the stream bench: "... after heart. I
    # have the numbers from last quarter ..." all at 9.98 s of 10 s). They were not heard.
    session, _ = make_session(interim_every_s=0.5, endpointing_ms=400)
    inner = session.transcribe

    async def runs_on(audio, opts):
        heard = await inner(audio, opts)
        end = audio.duration_s - 0.02
        loop = tuple(Word(text, end, end, 0.5) for text in (" One", " two", " three.", " One", " two"))
        return Transcript((*heard.segments, Segment("", end, end, -0.5, 5, loop)), "en", 0.99, audio.duration_s)

    session.transcribe = runs_on
    events = run(session)
    said = " ".join(e["text"] for e in events if e["is_final"] and e["text"]).split()
    assert said == ["One", "two", "three.", "Four", "five.", "Six", "seven."]
    for event in events:  # interims too: none of the added words (each of no length; marks are)
        assert all(w["start"] < w["end"] or w["word"] in ".," for w in event["words"]), event


def test_an_utterance_s_first_word_timed_early_into_the_pause_is_kept():
    # Whisper often times an utterance's first word early, into the silence before it; when the
    # utterance starts soon after the last one's endpoint, that word's middle can lie before the
    # utterance's audio (Beckett's "Fail better.": "Fail" at 7.97-8.31 s, the utterance from
    # 8.20 s), and it was taken for left context and lost. Here "Six" (4.1 s) is timed 3.2-3.8 s,
    # the second utterance's audio starts at 3.6 s, and the first's last word ends at 2.9 s.
    session, _ = make_session(interim_every_s=0.5, endpointing_ms=400)
    inner = session.transcribe

    async def early(audio, opts):
        heard = await inner(audio, opts)
        origin = session.offset_s + len(session.buffer) / SAMPLE_RATE - audio.duration_s
        words = tuple(Word(w.text, 3.2 - origin, 3.8 - origin, w.probability) if w.text == " Six" else w
                      for w in heard.words)
        return Transcript((Segment("", 0, audio.duration_s, -0.1, len(words), words),), "en", 0.99, audio.duration_s)

    session.transcribe = early
    events = run(session)
    finals = [e for e in events if e["is_final"] and e["text"]]
    assert " ".join(e["text"] for e in finals).split() == ["One", "two", "three.", "Four", "five.", "Six", "seven."]
    assert finals[-1]["start"] == pytest.approx(3.2)  # and no word of the first utterance again


@pytest.mark.parametrize(
    ("heard", "said"),
    [
        # A quiet word the VAD took for silence (the MFA cold corpus: "... sounds a lot different."
        # then "than the acoustic corpus", the utterance from "acoustic"): it leads into the next
        # utterance, which hears it in its left context, and is kept.
        ((" Then", 3.0, 3.3), "One two three. Four five. Then Six seven."),
        # The last final word heard again after it: not said twice.
        ((" five.", 2.95, 3.3), "One two three. Four five. Six seven."),
        # A word timed from within the last final word is that word heard as another.
        ((" fine.", 2.5, 3.3), "One two three. Four five. Six seven."),
        # So is one timed into the pause before the utterance (as an utterance's first word may be).
        ((" fives.", 2.7, 4.0), "One two three. Four five. Six seven."),
        # Not a phrase that runs on into the utterance (more than a second before it).
        ((" Thanks.", 2.95, 3.05), "One two three. Four five. Six seven."),
    ],
)
def test_words_heard_between_utterances_that_lead_into_the_next_are_kept(heard, said):
    # The first utterance's final decodes its audio up to 3.2 s (its endpoint), the second's
    # audio starts at 3.6 s (its speech at 4.1 s); each decode that covers ``heard`` hears it.
    session, _ = make_session(interim_every_s=0.5, endpointing_ms=300)
    inner = session.transcribe
    text, start, end = heard

    async def hears(audio, opts):
        transcript = await inner(audio, opts)
        origin = session.offset_s + len(session.buffer) / SAMPLE_RATE - audio.duration_s
        words = list(transcript.words)
        if origin <= start and origin + audio.duration_s >= end:
            words.append(Word(text, start - origin, end - origin, 0.8))
        words = tuple(sorted(words, key=lambda w: w.start))
        return Transcript((Segment("", 0, audio.duration_s, -0.1, len(words), words),), "en", 0.99, audio.duration_s)

    session.transcribe = hears
    events = run(session)
    finals = [e for e in events if e["is_final"] and e["text"]]
    assert " ".join(e["text"] for e in finals) == said
    assert finals[0]["start"] + finals[0]["duration"] == pytest.approx(2.9)  # the first final did not hear it


def test_a_word_heard_mostly_over_the_last_final_words_does_not_lead_into_the_utterance():
    # Through the service, MFA's cold corpus: "... probably good. All right." was final, and the
    # next utterance's decode heard "Alright," starting 0.09 s before the end of "right.": within
    # _RETIMED_S of it, but mostly over those words, so it is them heard again, not a lead-in.
    session, _ = make_session()
    session._final_end_s = 24.03
    session._history = [Word(" good.", 23.02, 23.34, 0.9), Word(" All", 23.75, 23.95, 0.9), Word(" right.", 23.95, 24.03, 0.9)]
    words = [Word(" good.", 23.02, 23.34, 0.9), Word(" Alright,", 23.94, 24.04, 0.9), Word(" thanks.", 24.30, 24.48, 0.9)]
    assert session._lead_in(words, 2) == []
    # A word that starts as early but lies mostly after them leads in.
    words[1] = Word(" and", 23.94, 24.25, 0.9)
    assert [w.text for w in session._lead_in(words, 2)] == [" and"]


def test_the_left_context_keeps_the_last_context_s_of_the_stream_s_audio():
    session, _ = make_session(context_s=10.0)
    for seconds in (5.4, 3.4):
        session._remember(np.full(int(seconds * SAMPLE_RATE), seconds, np.float32))
    assert len(session.past) == int(8.8 * SAMPLE_RATE)  # all of both, less than 10 s
    session._remember(np.full(4 * SAMPLE_RATE, 4.0, np.float32))
    assert len(session.past) == 10 * SAMPLE_RATE
    assert [round(float(session.past[i]), 1) for i in (0, 13 * SAMPLE_RATE // 5, -1)] == [5.4, 3.4, 4.0]


def test_no_interims_when_not_asked():
    session, _ = make_session(interim_every_s=0.5, interim_results=False)
    assert all(e["is_final"] for e in run(session))


def test_silence_is_not_kept():
    session, calls = make_session()

    async def go():
        for _ in range(100):  # 10 s of silence
            await session.feed(np.zeros(1600, np.float32))

    asyncio.run(go())
    assert calls == [] and len(session.buffer) <= SAMPLE_RATE and session.received_s == pytest.approx(10.0)


def test_linear16_decoder_handles_split_samples_channels_and_rates():
    tone = (np.sin(np.arange(8000) / 5) * 10000).astype("<i2")
    stereo = np.stack([tone, tone], axis=1).reshape(-1).tobytes()
    decoder = Linear16Decoder(sample_rate=8000, channels=2)
    out = np.concatenate([decoder.decode(stereo[i : i + 333]) for i in range(0, len(stereo), 333)] + [decoder.close()])
    assert len(out) == 16000  # 1 s at 8 kHz → 1 s at 16 kHz, the resampler's last samples too
    assert decoder.close().size == 0  # closing twice is harmless
    mono = Linear16Decoder(16000, 1)
    assert len(mono.decode(b"\x01")) == 0 and len(mono.decode(b"\x00\x02\x00")) == 2


def test_container_decoder_decodes_as_bytes_arrive(clips):
    from media import encode
    from pipeline.audio.decode import decode
    from pipeline.core.errors import InvalidAudio
    from pipeline.streaming.decoders import ContainerDecoder, stream_decoder

    samples = decode(clips["beckett"].path, max_duration_s=60).samples
    data = encode(samples, "ogg-opus")
    decoder = stream_decoder("ogg-opus", 16000, 1)
    assert isinstance(decoder, ContainerDecoder)
    parts = [decoder.decode(data[i : i + 4000]) for i in range(0, len(data), 4000)]
    parts.append(decoder.close())
    assert decoder.close().size == 0  # closing twice is harmless
    total = sum(len(p) for p in parts)
    assert total == pytest.approx(len(samples), abs=16000 * 0.05)
    broken = ContainerDecoder()
    broken.decode(b"this is not an audio stream at all" * 100)
    with pytest.raises(InvalidAudio):
        broken.close()


def recording_session(**options):
    """A session with the real Silero VAD and a recogniser that records what it is given (absolute
    start sample, samples) and hears one word over the whole of it."""
    heard = []

    async def transcribe(audio, opts):
        # The audio ends at the live edge; it may start before the utterance (left context).
        lead = len(audio.samples) - len(session.buffer)
        heard.append((int(round(session.offset_s * SAMPLE_RATE)) - lead, audio.samples))
        word = Word(" heard", lead / SAMPLE_RATE, audio.duration_s, 0.9)
        return Transcript((Segment(word.text, 0.0, audio.duration_s, -0.1, 1, (word,)),), "en", 0.99, audio.duration_s)

    session = StreamingSession(transcribe, StreamOptions(**options))
    return session, heard


@pytest.mark.parametrize("lead_s, frame_s", [(0.0, None), (3.0, None), (0.0, 2.5), (0.0, 1.0)])
def test_speech_in_frames_longer_than_the_vad_window_is_transcribed(clips, lead_s, frame_s):
    """Regression (review finding 1): VAD looked only at the last second, and while no speech was
    seen the buffer was trimmed to 0.5 s, so one 3 s frame (speech, then 1 s of silence) lost every
    word. Browsers send 1 s slices; container decoders emit bursts (None: the whole in one frame)."""
    from pipeline.audio.decode import decode
    from pipeline.streaming.session import silero_vad

    speech = decode(clips["fox"].path, max_duration_s=60).samples
    audio = np.concatenate([np.zeros(int(lead_s * SAMPLE_RATE), np.float32), speech, np.zeros(SAMPLE_RATE, np.float32)])
    step = len(audio) if frame_s is None else int(frame_s * SAMPLE_RATE)
    session, heard = recording_session()

    async def go():
        events = []
        for i in range(0, len(audio), step):
            events += await session.feed(audio[i : i + step])
        return events + await session.finish()

    events = asyncio.run(go())
    finals = [e for e in events if e["is_final"]]
    assert [w["word"] for e in finals for w in e["words"]] == ["heard"]
    # The recogniser got a true slice of the stream holding all that the VAD calls speech.
    spans = silero_vad(audio)
    start, samples = heard[-1]
    assert start <= spans[0][0] and start + len(samples) >= spans[-1][1]
    np.testing.assert_array_equal(samples, audio[start : start + len(samples)])


def test_vad_runs_off_the_event_loop():
    """Review finding 13: the ingress loop has 0.1 CPU, and Silero ran on it every 100 ms per stream."""
    import threading

    released = threading.Event()

    def vad(samples):
        # Released by a callback of the event loop: run on the loop itself, it would wait in vain.
        assert released.wait(timeout=5), "the VAD blocked the event loop"
        return [(0, len(samples))]

    async def transcribe(audio, opts):
        return Transcript((), "en", 1.0, audio.duration_s)

    session = StreamingSession(transcribe, vad=vad)

    async def go():
        asyncio.get_running_loop().call_soon(released.set)
        return await session.feed(np.full(SAMPLE_RATE // 10, 0.1, np.float32))

    assert asyncio.run(go()) == [] and session.speech_seen


# ---- limits (review finding 8) ---------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_budget_allows_a_burst_and_4x_real_time_but_not_more():
    from pipeline.core.errors import RateLimited
    from pipeline.streaming.limits import StreamBudget, StreamLimits

    clock = Clock()
    budget = StreamBudget(StreamLimits(max_speed_x=4.0, burst_s=10.0), clock=clock)
    budget.take(10.0)  # a late start: 10 s buffered, sent at once
    for _ in range(5):  # then real time, which refills the burst
        clock.now += 1.0
        budget.take(1.0)
    for _ in range(600):  # then 10 minutes of audio in 1 s slices at 4x real time
        clock.now += 0.25
        budget.take(1.0)
    assert budget.received_s == pytest.approx(615.0)
    # At 5x the bucket drains by 0.2 s a slice: refused once the burst is spent, with the wait.
    with pytest.raises(RateLimited) as refused:
        for _ in range(100):
            clock.now += 0.2
            budget.take(1.0)
    assert refused.value.code == "RATE_LIMITED" and refused.value.extra["retry_after"] == 1
    assert 40 <= budget.received_s - 615.0 <= 50  # about burst_s / 0.2 s slices
    # A pause refills the burst, and no more.
    clock.now += 3600
    assert budget.allowance_s() == pytest.approx(10.0)


def test_budget_caps_length_and_frame_size():
    from pipeline.core.errors import AudioTooLong
    from pipeline.streaming.limits import FrameTooLarge, StreamBudget, StreamLimits

    clock = Clock()
    budget = StreamBudget(StreamLimits(max_duration_s=30.0, max_frame_kib=64), clock=clock)
    for _ in range(29):
        clock.now += 1.0
        budget.take(1.0)
    assert budget.allowance_s() == pytest.approx(1.0)
    with pytest.raises(AudioTooLong) as too_long:
        budget.take(1.5)
    assert too_long.value.to_body()["max_duration_s"] == 30
    budget.check_frame(64 * 1024)
    with pytest.raises(FrameTooLarge) as too_large:
        budget.check_frame(64 * 1024 + 1)
    assert too_large.value.to_body() == {"error": too_large.value.message, "code": "INVALID_PARAMETER", "param": "message"}


def opus_of(clip):
    from media import encode
    from pipeline.audio.decode import decode

    samples = decode(clip.path, max_duration_s=60).samples
    return samples, encode(samples, "ogg-opus")


def test_container_decoder_holds_bounded_audio_and_bytes(clips):
    """The decoder's queue was unbounded and its pipe joined every frame into one growing buffer."""
    from conftest import wait_until
    from pipeline.core.errors import RateLimited
    from pipeline.streaming.decoders import ContainerDecoder

    samples, data = opus_of(clips["beckett"])  # 10 s
    # Decoded audio waits to be taken, at most max_ready_s (and one decoded frame) of it.
    decoder = ContainerDecoder(max_backlog_bytes=len(data), max_ready_s=1.0)
    assert len(decoder.decode(data)) == 0  # nothing decoded yet
    wait_until(lambda: decoder._ready_n >= SAMPLE_RATE, 10, interval_s=0.01, what="a second decoded")
    first = decoder.decode(b"")
    assert SAMPLE_RATE <= len(first) <= 1.1 * SAMPLE_RATE
    # Closing with a limit stops the decoder there; without one it returns the rest.
    rest = decoder.close(max_s=2.0)
    assert 2 * SAMPLE_RATE < len(rest) <= 3.2 * SAMPLE_RATE and not decoder._thread.is_alive()
    whole = ContainerDecoder(max_backlog_bytes=len(data), max_ready_s=1.0)
    whole.decode(data)
    assert len(whole.close()) == pytest.approx(len(samples), abs=SAMPLE_RATE * 0.05)
    # Encoded bytes beyond the backlog are refused, not queued.
    small = ContainerDecoder(max_backlog_bytes=len(data) - 1)
    with pytest.raises(RateLimited):
        small.decode(data)
    small.abort()
    assert not small._thread.is_alive()


class FakeRecognizer:
    """The Recognizer seam: an engine that hears nothing."""

    async def capabilities(self):
        from pipeline.asr.base import Capabilities

        return Capabilities("fake", word_timestamps=True, language_detection=True, languages=frozenset({"en"}))

    async def transcribe(self, audio, options):
        return Transcript((), "en", 1.0, audio.duration_s)


class FakeChannel:
    """The client: sends ``inbox`` in order, each message ``advance_s`` after the one before."""

    def __init__(self, inbox, clock, advance_s):
        self.inbox, self.clock, self.advance_s = list(inbox), clock, advance_s
        self.sent, self.close_code = [], None

    async def receive(self):
        from pipeline.streaming.server import ChannelClosed

        if not self.inbox or self.close_code is not None:
            raise ChannelClosed
        self.clock.now += self.advance_s
        return self.inbox.pop(0)

    async def send_json(self, message):
        self.sent.append(message)

    async def close(self, code, reason=""):
        self.close_code = code


class BookMeter:
    """The Meter seam over a real ``LimitBook`` (the Accounting deployment's logic)."""

    def __init__(self, audio_hours_per_day: float = 0.0) -> None:
        from pipeline.core.settings import KeyLimits
        from pipeline.service.limits import LimitBook

        self.book = LimitBook(KeyLimits(audio_hours_per_day=audio_hours_per_day, concurrent_requests=0))

    async def reserve(self, duration_s):
        return self.book.reserve_audio("k", duration_s)

    async def extend(self, reservation, duration_s):
        self.book.extend_audio("k", reservation, duration_s)

    async def settle(self, reservation, duration_s):
        self.book.settle_audio("k", reservation, duration_s)

    async def cancel(self, reservation):
        self.book.cancel_audio("k", reservation)

    @property
    def charged_s(self) -> float:
        return self.book.usage("k")["audio_s_today"]


def serve_stream(frames, limits, advance_s, meter=None, recognizer=None, **server_options):
    """Serve ``frames`` then CloseStream; returns (messages sent, close code, seconds charged)."""
    import json

    from pipeline.streaming.server import StreamParams, StreamServer
    from pipeline.transcription.flow import TranscriptionFlow

    clock = Clock()
    server = StreamServer(TranscriptionFlow(recognizer or FakeRecognizer(), speakers=None), limits, clock=clock,
                          **server_options)
    channel = FakeChannel([*({"bytes": f} for f in frames), {"text": json.dumps({"type": "CloseStream"})}], clock, advance_s)
    meter = meter or BookMeter()
    asyncio.run(server.serve(channel, StreamParams(), meter=meter))
    assert meter.book.usage("k")["audio_s_reserved"] == 0  # nothing left reserved
    return channel.sent, channel.close_code, meter.charged_s


SECOND = bytes(2 * SAMPLE_RATE)  # 1 s of linear16 silence


@pytest.mark.parametrize("advance_s, frame, n, expected", [
    (0.25, SECOND, 120, ("Metadata", 1000, 120.0)),  # 4x real time, for two minutes
    (0.0, SECOND, 60, ("RATE_LIMITED", 1008, 10.0)),  # a minute at once: the burst, then refused
    (1.0, SECOND, 40, ("AUDIO_TOO_LONG", 1008, 30.0)),  # real time, past the length cap
    (1.0, SECOND * 3, 1, ("INVALID_PARAMETER", 1009, 0.0)),  # one frame over the size cap
])
def test_stream_server_holds_streams_to_their_limits(advance_s, frame, n, expected):
    """Review finding 8: any pace, any length and frames up to 16 MiB were taken."""
    from pipeline.streaming.limits import StreamLimits

    limits = StreamLimits(max_speed_x=4.0, burst_s=10.0, max_duration_s=30.0 if n == 40 else 7200.0, max_frame_kib=64)
    sent, code, charged = serve_stream([frame] * n, limits, advance_s)
    last = sent[-1]
    assert (last.get("code", last["type"]), code, charged) == pytest.approx(expected)


def test_a_stream_is_cut_off_when_its_keys_audio_quota_runs_out():
    """Review finding 5: streams were charged only at their end and never checked while running."""
    from pipeline.streaming.limits import StreamLimits

    meter = BookMeter(audio_hours_per_day=60 / 3600)  # one minute a day
    sent, code, charged = serve_stream([SECOND] * 120, StreamLimits(), 1.0, meter=meter)
    assert (sent[-1].get("code"), code) == ("RATE_LIMITED", 1008)
    assert 55 <= charged <= 60  # cut within one reservation step of the quota, charged what was received
    sent, code, _ = serve_stream([SECOND], StreamLimits(), 1.0, meter=meter)  # spent: refused at once
    assert (sent[-1].get("code"), code) == ("RATE_LIMITED", 1008)


@pytest.mark.parametrize("final_beam_size", [1, 5, None])
def test_the_server_decodes_finals_at_the_beam_width_it_is_given(clips, final_beam_size):
    """``stream_final_beam_size`` reaches every final decode of a stream; interims stay greedy."""
    from pipeline.audio.decode import decode
    from pipeline.streaming.limits import StreamLimits
    from pipeline.tools.stream_client import linear16

    asked = []

    class Recording(FakeRecognizer):
        async def transcribe(self, audio, options):
            asked.append(options)
            return await super().transcribe(audio, options)

    pcm = linear16(decode(clips["beckett"].path, max_duration_s=60).samples)
    frames = [pcm[i : i + SAMPLE_RATE] for i in range(0, len(pcm), SAMPLE_RATE)]  # 0.5 s each
    sent, code, _ = serve_stream(frames, StreamLimits(), 0.5, recognizer=Recording(), final_beam_size=final_beam_size)
    assert code == 1000 and sent[-1]["type"] == "Metadata"
    finals, interims = [o for o in asked if not o.interim], [o for o in asked if o.interim]
    # (Interims run only while the server keeps up with the frames, which come at once here.)
    assert finals and {o.beam_size for o in finals} == {final_beam_size}
    assert all(o.beam_size == 1 for o in interims)


def test_a_busy_server_does_not_make_a_real_time_client_look_fast(clips):
    """Found by the playground's live test on a loaded machine: the pace was judged when a frame
    was read, and frames are not read while a decode runs, so the frames that came in meanwhile
    looked like a burst and a client speaking at 1x was cut off as "faster than 4x real time".
    Frames are now taken (and timed) as they arrive, while the decode runs."""
    from pipeline.audio.decode import decode
    from pipeline.streaming.limits import StreamLimits
    from pipeline.streaming.server import ChannelClosed, StreamParams, StreamServer
    from pipeline.tools.stream_client import linear16
    from pipeline.transcription.flow import TranscriptionFlow

    class SlowRecognizer(FakeRecognizer):
        calls = 0

        async def transcribe(self, audio, options):
            SlowRecognizer.calls += 1
            await asyncio.sleep(0.8)  # a decode that takes 0.8 s, as a busy 2-core server's do
            return await super().transcribe(audio, options)

    frame_s = 0.1
    speech = decode(clips["fox"].path, max_duration_s=60).samples
    pcm = linear16(np.concatenate([speech, np.zeros(SAMPLE_RATE, np.float32)]))
    step = int(2 * SAMPLE_RATE * frame_s)
    frames = [pcm[i : i + step] for i in range(0, len(pcm), step)]

    class RealTimeClient:
        """Frames arrive every 0.1 s whether or not the server reads them (the socket holds them)."""

        def __init__(self) -> None:
            self.arrived: asyncio.Queue = asyncio.Queue()
            self.sent, self.close_code = [], None

        async def play(self) -> None:
            for frame in frames:
                self.arrived.put_nowait({"bytes": frame})
                await asyncio.sleep(frame_s)
            self.arrived.put_nowait({"text": '{"type": "CloseStream"}'})

        async def receive(self):
            if self.close_code is not None:
                raise ChannelClosed
            return await self.arrived.get()

        async def send_json(self, message):
            self.sent.append(message)

        async def close(self, code, reason=""):
            self.close_code = code

    async def go(limits):
        client = RealTimeClient()
        server = StreamServer(TranscriptionFlow(SlowRecognizer(), speakers=None), limits)
        playing = asyncio.create_task(client.play())
        await server.serve(client, StreamParams(), meter=BookMeter())
        playing.cancel()
        return client

    # A burst of half a second: what 0.8 s of frames piled up in the socket exceeds.
    client = asyncio.run(go(StreamLimits(max_speed_x=4.0, burst_s=0.5)))
    errors = [m for m in client.sent if m["type"] == "Error"]
    assert errors == [] and client.sent[-1]["type"] == "Metadata" and client.close_code == 1000, errors
    assert SlowRecognizer.calls >= 2  # the decodes did run, slowly
    # A server that falls further behind than the backlog allows says so, instead of holding more.
    client = asyncio.run(go(StreamLimits(max_backlog_s=0.5)))
    assert client.sent[-1]["code"] == "SERVICE_UNAVAILABLE" and client.close_code == 1013, client.sent[-1]


def test_the_backlog_is_empty_again_once_its_audio_is_taken():
    # Regression: a float sum of seconds kept a residue (2.8e-17 after 0.1 + 0.2 + 0.1 s in and
    # out), so a stream looked behind forever and never got an interim.
    from pipeline.streaming.server import _Backlog

    async def go():
        backlog = _Backlog()
        for n in (1600, 3200, 1600, 1234):
            backlog.put("audio", np.zeros(n, np.float32))
        assert backlog.audio_s == pytest.approx(7634 / SAMPLE_RATE)
        for _ in range(4):
            await backlog.get()
        return backlog.audio_s

    assert asyncio.run(go()) == 0


def words_of(text: str, start: float = 0.0) -> list[Word]:
    return [Word(" " + w, start + i * 0.3, start + i * 0.3 + 0.25, 0.9) for i, w in enumerate(text.split())]


@pytest.mark.parametrize(
    ("history", "fresh", "kept"),
    [
        # The context's last words heard again, cut short, as the next utterance: dropped.
        ("so what can I say? Oh, I don't hear that in New Jersey now.", "I don't hear that in New Jersey Bye.", "Bye."),
        ("Chicago. Oh, I know.", "Oh, I know. Well,", "Well,"),
        # Short repeats can be real ("Hello? Hello?"): kept.
        ("Hello?", "Hello? Oh, hello.", "Hello? Oh, hello."),
        ("I said no no", "no no no.", "no no no."),
        # The same words further back in the history are not a repeat of its end.
        ("I don't hear that in New Jersey now. Well, there isn't that much difference.", "I don't hear that", "I don't hear that"),
        # Nor a sentence said again after other words (the speaker repeats what they heard).
        ("Sheila and Texas originally from Chicago. Oh, I'm...", "originally from Chicago also.",
         "originally from Chicago also."),
    ],
)
def test_a_decode_that_repeats_the_last_final_words_of_the_stream_loses_the_repeat(history, fresh, kept):
    from pipeline.streaming.session import _drop_repeat

    out = _drop_repeat(words_of(fresh, 10.0), words_of(history))
    assert " ".join(w.text.strip() for w in out) == kept
