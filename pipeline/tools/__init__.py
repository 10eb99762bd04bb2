"""Tools around the service: scoring (WER/DER helpers) and the stream client behind hark stream."""
