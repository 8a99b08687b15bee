"""jaxalign: align Hugging Face Llama-family models with JAX/Flax (SFT, RM, DPO, PPO)."""

__version__ = "0.1.0"
