"""Audio in: recognise and decode once (PyAV), fetch URLs under the SSRF policy, Silero VAD."""
