"""Text around the model: the tokenizer, the chat template and stop tokens, sampling."""
