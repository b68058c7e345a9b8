"""minilora: LoRA fine-tuning from first principles, on a GPT-2 with hand-written backprop.

The same layer code runs on NumPy (CPU) or CuPy (GPU); see minilora.backend. The names below are
the Python API a notebook needs; every module can also be imported on its own. The top-level files
and layers/, lora/, quant/ and training/ are the reference: plain array code that reads as its
formulas and never imports fast/, the fast path, which plugs in from above as the jobs, the lab,
the command line and the assignments do. Each folder's ``__init__.py`` gives its own reading order.

Reading order:

    backend.py            one code path for NumPy and CuPy: get_xp, to_device / to_numpy, seeded generators
    config.py             GPTConfig, the facts a config states about its model, and the presets
    layers/               every layer as a forward/backward pair of plain functions, and the LayerOps seam
    language_model.py     what both model families share: named parameters, freezing, the linear hook
    model.py              the GPT-2 model: forward, hand-written backward, a key/value cache for generation
    activation_memory.py  gradient checkpointing and the loss in chunks of rows, for both families
    optim.py              AdamW, SGD with momentum, global gradient clipping, the warmup-cosine schedule
    training/             batches, one optimiser step in two halves, the loop, bits per byte
    gradcheck.py          float64 central differences, which every backward is checked against
    generate.py           sampling with a key/value cache, temperature and top-k
    lora/                 the LoRA, DoRA and QLoRA layers, their variants, and a model that carries adapters
    quant/                frozen weights held as quantized blocks: GGUF's Q4_1 and Q8_0, and NF4
    weight_formats.py     how a weight is held, dense or quantized, and the layer pair that uses it
    llama.py              the Llama family (RMSNorm, RoPE, grouped-query attention, SwiGLU): SmolLM2
    validate.py           checks for the values of configs and settings, each a ValueError naming the field
    version.py            the version, in one place
    io/                   files in and out: checkpoints, adapters, PEFT's format, corpora, tokenizers, GGUF
    jobs/                 pretrain and finetune: the reference and the fast path wired together
    fast/                 the fast path: CPU and GPU layer functions and steps, data parallelism
    lab/                  benchmarks, the memory ledger, experiments, plots, the demo, the PyTorch peers
    tasks/                did the fine-tune work: tasks with checkable answers, scored on held-out items
    cli/                  the ``minilora`` command, one thin subcommand per job
    __main__.py           ``python -m minilora``: the same command line
    assignments/          the autograded course assignments, cut from this source
"""

from .config import GPTConfig, get_preset
from .generate import generate
from .io.adapters import load_adapter, save_adapter
from .io.checkpoint import load_model
from .io.data import SHIPPED_BASE, load_corpus
from .jobs.finetune import fit
from .lora.accounting import model_summary_line
from .lora.config import LoraConfig
from .lora.model import LoraGPT, add_lora
from .model import GPT, init_params
from .training.evaluate import bits_per_byte
from .training.loop import TrainSettings
from .version import __version__ as __version__

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
