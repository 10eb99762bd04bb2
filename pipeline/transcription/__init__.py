"""One transcription: API options and response (schemas), ASR beside diarization (flow), the merge and the rendering."""
