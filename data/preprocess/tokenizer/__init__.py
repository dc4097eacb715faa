"""Tokenizer training (SentencePiece BPE), its HF export, and fast encoding for the tokenize stage."""
