"""The GPT model, built from the config one pipeline stage at a time."""
