"""minilora: LoRA fine-tuning from first principles, on a GPT-2 with hand-written backprop.

The same layer code runs on NumPy (CPU) or CuPy (GPU); see minilora.backend.
"""

__version__ = "0.1.0"
