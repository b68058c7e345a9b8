"""minilora: LoRA fine-tuning from first principles, on a GPT-2 with hand-written backprop.

The same layer code runs on NumPy (CPU) or CuPy (GPU); see minilora.backend. The names below are
the Python API a notebook needs; every module can also be imported on its own.
"""

from .config import GPTConfig, get_preset  # noqa: E402
from .generate import generate  # noqa: E402
from .io.adapters import load_adapter, save_adapter  # noqa: E402
from .io.checkpoint import load_model  # noqa: E402
from .io.data import SHIPPED_BASE, load_corpus  # noqa: E402
from .jobs.finetune import fit  # noqa: E402
from .lora.accounting import model_summary_line  # noqa: E402
from .lora.config import LoraConfig  # noqa: E402
from .lora.model import LoraGPT, add_lora  # noqa: E402
from .model import GPT, init_params  # noqa: E402
from .training.evaluate import bits_per_byte  # noqa: E402
from .training.loop import TrainSettings  # noqa: E402
from .version import __version__ as __version__  # noqa: E402

__all__ = [
    "GPT",
    "GPTConfig",
    "LoraConfig",
    "LoraGPT",
    "SHIPPED_BASE",
    "TrainSettings",
    "add_lora",
    "bits_per_byte",
    "fit",
    "generate",
    "get_preset",
    "init_params",
    "load_adapter",
    "load_corpus",
    "load_model",
    "model_summary_line",
    "save_adapter",
]
