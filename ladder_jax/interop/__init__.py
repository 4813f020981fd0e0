"""Other ecosystems' checkpoints in and out: Hugging Face Llama (hf)."""
