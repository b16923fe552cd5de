"""Checkpoints and processes from outside the project.

- `hf`: Hugging Face Llama / Gemma directories (config.json + safetensors) <-> our model.
- `gguf_weights`: Llama-architecture GGUF files (llama.cpp), dequantized with `gguf`.
- `formats`: `gguf:PATH` / `hf:DIR` locations, one entry point per direction
  (`load_external`, `export_external`), used by `warm-jax import` / `warm-jax export`.
- `distributed`: multi-process JAX from `WARM_JAX_*` environment variables (launch/).
"""
