"""The bad-input corpus: see corpus.py (cases, their builders and their expected outcomes)."""
