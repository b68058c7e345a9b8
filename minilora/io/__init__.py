"""Files in and out: checkpoints, adapter files (minilora's and PEFT's), corpora, tokenizers, GGUF models.

Everything here reads or writes bytes; nothing computes a forward or a gradient. Writes are atomic
(a temporary file, then a rename), so a failed save leaves the previous file intact. SmolLM2's GGUF
file is fetched from the package index (smollm2.py), read and dequantised (gguf_file.py), and its
byte-level BPE tokenizer is built from the file's metadata (bpe.py).
"""
