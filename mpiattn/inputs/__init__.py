"""What a job computes on: seeded batches and token files (``data``), text streamed and
tokenized in chunks (``textstream``), the training corpus (``corpus``).
"""
