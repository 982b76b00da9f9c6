"""megagpt: tensor, pipeline and data parallel GPT training in the style of Megatron-LM."""

__version__ = "0.1.0"
