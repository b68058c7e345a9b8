"""Files in and out: checkpoints, adapter files (minilora's and PEFT's), corpora, tokenizers, GGUF models.

Everything here reads or writes bytes; nothing computes a forward or a gradient. Writes are atomic
(a temporary file, then a rename), so a failed save leaves the previous file intact, and a file that
cannot be read fails with one error that names it.

Reading order:

    tokenizer.py         the byte-level tokenizer: a token is one byte of the text's UTF-8, vocabulary 256
    data.py              corpora as arrays of token ids: the shipped ones, a file, a chat corpus
    json_text.py         JSON documents read from files, each failure one error naming the file
    safetensors_read.py  a safetensors file's tensors as NumPy arrays, bfloat16 included
    checkpoint.py        checkpoints as one safetensors file, replaced atomically
    run_folder.py        a run's folder: locked, never overwritten unasked, written whole
    provenance.py        the version, git commit, device and libraries behind a result
    adapters.py          adapter files: only the adapter, tied to its base by a fingerprint
    peft.py              adapters in Hugging Face PEFT's format, both ways
    info.py              human-readable descriptions of checkpoints and adapters (``minilora info``)
    smollm2.py           SmolLM2-135M-Instruct, fetched once from the package index, and its chat format
    gguf_file.py         a GGUF file read: its metadata, a llama config, its tensors as float32 or blocks
    bpe.py               byte-level BPE, SmolLM2's tokenizer, built from a GGUF file's vocabulary and merges
    llama_gguf.py        a minilora Llama built from a llama GGUF file, the weights renamed and transposed
    hf_checkpoint.py     a Llama written as a Hugging Face checkpoint folder (config.json, model.safetensors)
    bases.py             base models by name or path, each with its tokenizer: what ``--base`` accepts
    chat_data.py         conversations rendered in the chat format: a corpus to fine-tune a chat model on
"""
