"""A run's model outside the lab: its loss on any text (``evaluate``) and a Hugging Face transformers model
folder with its tokenizer and a model card (``export``)."""
