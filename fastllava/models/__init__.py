"""Model code: vision towers (clip, siglip), the text decoder (llama), and LLaVA itself (llava)."""
