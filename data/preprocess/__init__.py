"""Raw JSONL to Megatron-Core `.bin/.idx`: clean, desensitize, label, dedup, train the tokenizer, tokenize.

Run ``python -m data.preprocess --help``. Every stage streams its input, writes numbered output parts,
``rejected/<rule>.jsonl`` and a ``report.json`` into a temporary directory that is renamed into place
only when the stage has finished, so a directory with a ``report.json`` is always complete.
"""
