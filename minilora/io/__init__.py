"""Files in and out: checkpoints, adapter files (minilora's and PEFT's), the shipped corpora, the tokenizer.

Everything here reads or writes bytes; nothing computes a forward or a gradient. Writes are atomic
(a temporary file, then a rename), so a failed save leaves the previous file intact.
"""
