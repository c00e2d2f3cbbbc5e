"""The fused attention path and the KV cache give the same results as the plain paths."""
import pytest
import torch

import llm

SCHEMES = [dict(pos_encoding=p, n_kv_head=kv) for p in ("learned", "sinusoidal", "rope") for kv in (0, 1)]


def tiny_model(**overrides):
    llm.set_seed(0)
    cfg = llm.Config(n_layer=2, n_head=2, n_embd=16, block_size=12, device="cpu", **overrides)
    return llm.GPT(cfg, 23).eval()


@pytest.mark.parametrize("switches", SCHEMES)
def test_fused_attention_equals_the_hand_written_path(switches):
    torch.manual_seed(0)
    attn = llm.MultiHeadAttention(llm.Config(n_embd=32, n_head=4, **switches)).eval()
    x = torch.randn(3, 10, 32)
    fused = attn(x)
    assert attn.weights is None  # outside the block: the fused path, which keeps no weights
    with llm.keeping_attention_weights(attn):
        hand_written = attn(x)
        assert attn.weights.shape == (3, 4, 10, 10)  # the hand-written path ran
    torch.testing.assert_close(fused, hand_written)


@pytest.mark.parametrize("switches", SCHEMES)
def test_cached_logits_equal_a_full_forward_at_every_position(switches):
    model = tiny_model(**switches)
    idx = torch.randint(23, (1, 12))
    full, _ = model(idx)  # (1, 12, V)
    with torch.no_grad():
        cache = llm.KVCache(model)
        assert cache.position == 0 and len(cache.layers) == model.cfg.n_layer
        with cache.attached(model):
            prefill, _ = model(idx[:, :5])  # the first five positions at once
        torch.testing.assert_close(prefill, full[:, :5], atol=1e-5, rtol=1e-5)
        assert cache.position == 5
        with cache.attached(model):
            chunk, _ = model(idx[:, 5:8])  # three more after cached keys: the shifted mask
        torch.testing.assert_close(chunk, full[:, 5:8], atol=1e-5, rtol=1e-5)
        for t in range(8, 12):  # then one position at a time: no mask at all
            with cache.attached(model):
                step, _ = model(idx[:, t:t + 1])
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    assert cache.position == 12 and cache.layers[0].k.shape == (1, model.cfg.kv_heads, 12, 8)
    assert all(layer.length == 12 and layer.v.shape == layer.k.shape for layer in cache.layers)
    assert all(block.attn.cache is None for block in model.blocks)  # detached after each block
    torch.testing.assert_close(model(idx)[0], full)  # and the model runs without a cache again


@pytest.mark.parametrize("switches", SCHEMES)
def test_cached_next_token_logits_equal_a_full_forward(switches):
    model = tiny_model(**switches)
    ids = torch.randint(23, (12,)).tolist()
    full, _ = model(torch.tensor([ids]))  # (1, 12, V)
    with torch.no_grad():
        cache = llm.KVCache(model)
        for t in range(5, 13):  # a prefill of five tokens, then one token at a time
            logits = llm.cached_next_token_logits(model, ids[:t], cache)
            torch.testing.assert_close(logits, full[:, t - 1], atol=1e-5, rtol=1e-5)
            assert cache.position == t


@pytest.mark.parametrize("switches", SCHEMES)
def test_generation_with_and_without_the_cache_agree_past_block_size(switches, monkeypatch):
    model = tiny_model(**switches)
    seen = {}
    real = llm.next_token_logits

    def record(model, ids, window_start, cache):
        logits = real(model, ids, window_start, cache)
        seen.setdefault(cache is not None, []).append(logits)
        return logits

    monkeypatch.setattr(llm, "next_token_logits", record)
    prompt = [1, 2, 3]
    with_cache = list(llm.generate(model, prompt, 40, generator=torch.Generator().manual_seed(5), use_cache=True))
    without = list(llm.generate(model, prompt, 40, generator=torch.Generator().manual_seed(5), use_cache=False))
    assert with_cache == without  # seeded text identical, 43 tokens: several windows of block_size 12
    assert len(seen[True]) == len(seen[False]) == 40
    for a, b in zip(seen[True], seen[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [False, True])
def test_window_restarts_keep_the_last_half(monkeypatch, use_cache):
    model = tiny_model()
    windows = []
    real = llm.next_token_logits

    def record(model, ids, window_start, cache):
        assert (cache is not None) == use_cache
        windows.append((len(ids), window_start))
        return real(model, ids, window_start, cache)

    monkeypatch.setattr(llm, "next_token_logits", record)
    list(llm.generate(model, [1] * 10, 8, temperature=0, use_cache=use_cache))
    assert all(0 < n - start <= 12 for n, start in windows)
    assert (13, 13 - 6) in windows  # at 13 tokens the window of 12 was full: keep the last 6


def test_bench_prints_every_figure(capsys):
    options = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
               "--device", "cpu", "--steps", "2", "--sample-tokens", "20"]
    assert llm.main(["bench", *options]) == 0
    out = capsys.readouterr().out
    for name in ("training tokens/s", "achieved GFLOP/s", "fraction of matmul peak", "KV cache", "no cache",
                 "peak memory", "parameters"):
        assert name in out
    flops = float(out.split("FLOPs per token (6N + 12LCT)")[1].split()[0])
    cfg = llm.Config(n_layer=1, n_head=2, n_embd=16, block_size=16)
    expected = 6 * llm.GPT(cfg, 65).num_parameters() + 12 * 1 * 16 * 16  # rope: no position table
    assert flops == pytest.approx(expected / 1e6, abs=0.005)


def test_gpu_size_is_about_ten_million_parameters():
    for arch in llm.ARCHITECTURES:
        cfg = llm.preset(arch, "gpu")
        llm.validate_config(cfg)
        assert cfg.block_size == 256
        assert 9e6 < llm.GPT(cfg, 65).num_parameters() < 11e6


def test_unknown_size_is_a_clear_error():
    with pytest.raises(llm.UserError, match="--size"):
        llm.preset("llama", "tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_training_uses_bf16_autocast_and_fused_adamw(tmp_path):
    from conftest import TINY_TEXT
    cfg = llm.Config(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=20,
                     eval_interval=10, eval_iters=2, device="cuda")
    result = llm.run_training(cfg, TINY_TEXT, tmp_path, log=lambda *_: None)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    optimizer = llm.configure_optimizer(result.model, cfg)
    assert optimizer.defaults["fused"] is True
