"""Language models: loading by alias, directory, GGUF or hub id; what a model argument names; the
cache of converted GGUF files; GGUF files shipped in chunks."""
