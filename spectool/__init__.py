"""spectool: speculative-decoding drafts for Hugging Face causal LMs, from inspection to a verified draft."""

__version__ = "0.1.0"
