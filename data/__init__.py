"""Tokenizers, toy tasks with verifiable rewards, and JSONL loaders."""
