"""Text generation: the KV cache, the decoding core shared by generate(), the CLI and the engine, sampling."""
