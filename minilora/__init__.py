"""minilora: LoRA fine-tuning from first principles, on a GPT-2 with hand-written backprop.

The same layer code runs on NumPy (CPU) or CuPy (GPU); see minilora.backend. The names below are
the Python API a notebook needs; every module can also be imported on its own.
"""

__version__ = "0.1.0"

from .adapter_io import load_adapter, save_adapter  # noqa: E402
from .checkpoint import load_model  # noqa: E402
from .config import GPTConfig, get_preset  # noqa: E402
from .data import SHIPPED_BASE, load_corpus  # noqa: E402
from .evaluate import bits_per_byte  # noqa: E402
from .finetune import fit  # noqa: E402
from .generate import generate  # noqa: E402
from .lora_accounting import model_summary_line  # noqa: E402
from .lora_config import LoraConfig  # noqa: E402
from .lora_model import LoraGPT, add_lora  # noqa: E402
from .model import GPT, init_params  # noqa: E402
from .train import TrainSettings  # noqa: E402

__all__ = [
    "GPT", "GPTConfig", "LoraConfig", "LoraGPT", "SHIPPED_BASE", "TrainSettings", "add_lora", "bits_per_byte", "fit", "generate",
    "get_preset", "init_params", "load_adapter", "load_corpus", "load_model", "model_summary_line", "save_adapter",
]
