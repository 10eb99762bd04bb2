"""Hark's domain core: audio, fetching, engines, formatting. No Ray Serve imports here."""
