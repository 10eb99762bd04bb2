"""Thin Ray Serve adapters around ``pipeline`` objects. The app is built by ``deployments.app``."""
