"""Real models to quantize: a Flax BERT that loads sentence-transformers MiniLM."""
