"""Models built from llmfast.nn."""
from llmfast.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
