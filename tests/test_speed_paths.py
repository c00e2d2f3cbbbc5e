"""The fused attention path and the KV cache give the same results as the plain paths."""
import pytest
import torch

import llm

SCHEMES = [dict(pos_encoding=p, n_kv_head=kv) for p in ("learned", "sinusoidal", "rope") for kv in (0, 1)]


def tiny_model(device="cpu", n_head=2, **overrides):
    llm.set_seed(0)
    cfg = llm.Config(n_layer=2, n_head=n_head, n_embd=16, block_size=12, device=str(device), **overrides)
    return llm.GPT(cfg, 23).to(device).eval()


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
def test_cached_logits_equal_a_full_forward_at_every_position(switches, device):
    model = tiny_model(device, **switches)
    idx = torch.randint(23, (1, 12), device=device)
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
    cache.clear()
    assert cache.position == 0


@pytest.mark.parametrize("cache_class", [llm.KVCache, llm.StaticKVCache])
@pytest.mark.parametrize("switches", SCHEMES + [dict(n_head=4, n_kv_head=2)])
def test_each_cache_gives_the_logits_of_a_full_forward_at_every_position(switches, cache_class, device):
    model = tiny_model(device, **switches)
    ids = torch.randint(23, (12,)).tolist()
    full, _ = model(torch.tensor([ids], device=device))  # (1, 12, V)
    with llm.evaluating(model):
        cache = cache_class(model)
        for t in range(1, 13):  # a prefill of one token, then one token at a time
            logits = cache.logits_after(model, ids[:t])
            torch.testing.assert_close(logits, full[:, t - 1], atol=1e-5, rtol=1e-5)
            assert cache.position == t
        cache.clear()  # a new window (its last half): prefilled again, then stepped
        window = ids[6:]
        full, _ = model(torch.tensor([window], device=device))  # (1, 6, V)
        for t in range(3, 7):
            torch.testing.assert_close(cache.logits_after(model, window[:t]), full[:, t - 1],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("switches", SCHEMES)
def test_the_static_step_fills_the_slots_with_the_plain_caches_keys_and_values(switches):
    model = tiny_model(**switches)
    ids = torch.randint(23, (9,)).tolist()
    with llm.evaluating(model):
        plain, static = llm.KVCache(model), llm.StaticKVCache(model)
        plain.logits_after(model, ids)  # all nine at once
        for t in range(3, 10):  # a prefill of three, then six static steps
            static.logits_after(model, ids[:t])
    for layer, k_slots, v_slots in zip(plain.layers, static.k, static.v):
        torch.testing.assert_close(k_slots[:, :, :9], layer.k, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v_slots[:, :, :9], layer.v, atol=1e-6, rtol=1e-5)
        assert (k_slots[:, :, 9:] == 0).all()  # slots not reached stay as they were


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_generate_records_one_cuda_graph_and_replays_it(monkeypatch):
    model = tiny_model("cuda")
    made = []
    real = llm.make_cache
    monkeypatch.setattr(llm, "make_cache", lambda m: made.append(real(m)) or made[-1])
    list(llm.generate(model, [1, 2, 3], 30, generator=llm.seeded_generator(model, 0), use_cache=True))
    assert len(made) == 1 and isinstance(made[0], llm.StaticKVCache)
    # one graph per number of new tokens: the prompt's 3, one token, and a restart's half window
    assert sorted(made[0].graphs) == [1, 3, 6]


@pytest.mark.parametrize("switches", SCHEMES)
def test_generation_with_and_without_the_cache_agree_past_block_size(switches, monkeypatch, device):
    model = tiny_model(device, **switches)
    seen = {}
    real = llm.next_token_logits

    def record(model, ids, window_start, cache):
        logits = real(model, ids, window_start, cache)
        seen.setdefault(cache is not None, []).append(logits)
        return logits

    monkeypatch.setattr(llm, "next_token_logits", record)
    prompt = [1, 2, 3]
    with_cache = list(llm.generate(model, prompt, 40, generator=llm.seeded_generator(model, 5), use_cache=True))
    without = list(llm.generate(model, prompt, 40, generator=llm.seeded_generator(model, 5), use_cache=False))
    assert with_cache == without  # seeded text identical, 43 tokens: several windows of block_size 12
    assert len(seen[True]) == len(seen[False]) == 40
    for a, b in zip(seen[True], seen[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("switches", SCHEMES)
def test_seeded_sampling_writes_the_same_text_through_the_static_and_the_plain_cache(switches, monkeypatch, device):
    model = tiny_model(device, **switches)
    texts = {}
    for cache_class in (llm.KVCache, llm.StaticKVCache):
        monkeypatch.setattr(llm, "make_cache", cache_class)
        texts[cache_class] = list(llm.generate(model, [4, 5], 60, temperature=1.5,
                                               generator=llm.seeded_generator(model, 9), use_cache=True))
    assert texts[llm.KVCache] == texts[llm.StaticKVCache]
    assert len(set(texts[llm.KVCache])) > 5  # a varied text (temperature 1.5), not one token repeated


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
                 "peak memory", "parameters", "evaluation s", "evaluation share", "--size cpu"):
        assert name in out
    flops = float(out.split("FLOPs per token (6N + 12LCT)")[1].split()[0])
    cfg = llm.Config(n_layer=1, n_head=2, n_embd=16, block_size=16)
    expected = 6 * llm.GPT(cfg, 65).num_parameters() + 12 * 1 * 16 * 16  # rope: no position table
    assert flops == pytest.approx(expected / 1e6, abs=0.005)


def test_device_hooks_evaluate_as_section_10_does(device):
    model = tiny_model(device)
    cfg = model.cfg
    data = torch.randint(23, (500,))
    batches = llm.fixed_batches(data, llm.Config(block_size=12, batch_size=4, eval_iters=3), 0)
    hooks = llm.DeviceHooks(cfg, llm.Distributed(), device)
    plain = llm.estimate_loss(model, batches)
    first, again = hooks.estimate_loss(model, batches), hooks.estimate_loss(model, batches)
    assert first == again  # the same fixed batches, copied to the device once
    if device.type == "cpu":
        assert first == plain  # the CPU's evaluation is section 10's, to the last bit
    else:
        assert first == pytest.approx(plain, abs=0.02)  # bfloat16 on a GPU
        assert len(hooks.on_gpu) == 1


def test_the_gpu_preset_spends_under_a_tenth_of_its_forward_passes_evaluating():
    cfg = llm.preset("llama", "gpu")
    evaluations = llm.evaluations_per_run(cfg)
    assert evaluations == cfg.max_iters // cfg.eval_interval + 1 == 9  # 0, 250, ..., 2000
    evaluation_passes = evaluations * 2 * cfg.eval_iters  # a forward pass per batch and split
    training_passes = cfg.max_iters * 3  # a forward and a backward (about two forwards) per step
    assert evaluation_passes / (evaluation_passes + training_passes) < 0.1
    assert llm.evaluations_per_run(llm.Config(max_iters=1010, eval_interval=100)) == 12


def test_without_size_train_picks_the_gpu_preset_only_on_a_cuda_gpu(monkeypatch):
    args = llm.build_parser().parse_args(["train"])
    assert args.size is None
    assert llm.chosen_size(args, {"device": "cpu"}) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as if a GPU were there
    assert llm.chosen_size(args, {}) == "gpu"
    assert llm.chosen_size(args, {"device": "cpu"}) == "cpu"
    assert llm.chosen_size(llm.build_parser().parse_args(["train", "--size", "cpu"]), {}) == "cpu"


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_train_without_size_says_first_that_it_took_the_gpu_preset(tmp_path, tiny_text_file, capsys):
    from conftest import TINY_TRAIN_OPTIONS
    options = [o for o in TINY_TRAIN_OPTIONS if o not in ("--device", "cpu")]  # device: auto
    assert llm.main(["train", "--data", str(tiny_text_file), "--out-dir", str(tmp_path), *options]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert "gpu preset" in first_line and "--size cpu" in first_line
    assert llm.read_checkpoint(tmp_path / "ckpt.pt")[1].block_size == 16  # options still win
