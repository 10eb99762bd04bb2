"""Entry points that use Ray: the hark command and offline batch on Ray Data."""
