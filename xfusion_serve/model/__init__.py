"""The model: config, Llama blocks, dual-tower stack, attention backends, reference, checkpoints, prompts, VAE."""
