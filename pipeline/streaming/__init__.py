"""Live transcription: the session (VAD utterances, settling words), stream decoders, the WebSocket loop."""
