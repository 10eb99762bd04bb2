"""Hark's Ray-free core, one package per layer; imports point one way:

core → audio → asr, diarization → transcription → service, streaming (tools use any).
No Ray here (tests/test_layout.py checks it): Serve adapters live in ``deployments``, the CLI and
Ray Data batch in ``hark``.
"""
