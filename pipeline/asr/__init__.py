"""Speech recognition: the engine Protocol (base), its adapters (CTranslate2, transformers, vLLM), chunking, models and conversion."""
