"""Serving steered models: a vLLM plugin that steers each request as it asks (``caa.serve.plugin``),
and the engine-free parts it is made of (``caa.serve.steering``). vLLM is optional: nothing here
imports it at module level."""
