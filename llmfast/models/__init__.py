"""Models built from llmfast.nn."""
from llmfast.models.gpt import GPT, GPTConfig
from llmfast.models.llama import Llama, LlamaConfig

__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig"]
