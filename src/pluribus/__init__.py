"""pluribus: DeepSeek-V4 post-training (specialists, generative reward, multi-teacher OPD) on any HF causal LM."""

__version__ = "0.1.0"
