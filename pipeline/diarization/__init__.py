"""Who spoke when: the Diarizer Protocol (base), the bundled backends (clustering, segmentation), pyannote."""
