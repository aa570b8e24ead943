"""Distillation: teachers (vLLM server, vLLM engine, Hugging Face), tokenizer alignment, the top-k
logit cache, KD losses, data packing and the trainer. Depends on `quasar`; knows nothing of chains."""
