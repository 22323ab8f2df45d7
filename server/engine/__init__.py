"""The engine: scheduling, KV and delta caches, the model runner and sampling, behind `Engine`."""
