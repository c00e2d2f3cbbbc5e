"""Appendices D, E and G: the fused attention path and the KV cache give the same results as the
plain paths; devices, sizes and torchrun's shares; bench."""
import pytest
import torch

import llm
from conftest import TINY_TEXT, TINY_TRAIN_OPTIONS, run_main

SCHEMES = [dict(pos_encoding=p, n_kv_head=kv) for p in ("learned", "sinusoidal", "rope") for kv in (0, 1)]


def seeded_model(device="cpu", n_head=2, **overrides):
    llm.set_seed(0)
    cfg = llm.RunConfig(n_layer=2, n_head=n_head, n_embd=16, block_size=12, device=str(device), **overrides)
    return llm.GPT(cfg, 23).to(device).eval()


@pytest.mark.parametrize("switches", SCHEMES)
def test_fused_attention_equals_the_hand_written_path(switches):
    torch.manual_seed(0)
    attn = llm.MultiHeadAttention(llm.RunConfig(n_embd=32, n_head=4, **switches)).eval()
    x = torch.randn(3, 10, 32)
    weights = llm.attention_weights(attn, x)  # (B, H, T, T), by causal_attention
    assert weights.shape == (3, 4, 10, 10)
    _, _, v = attn.heads(x)  # (B, Hkv, T, D)
    v = v.repeat_interleave(4 // attn.n_kv_head, dim=1)  # (B, H, T, D)
    hand_written = attn.proj((weights @ v).transpose(1, 2).reshape(3, 10, 32))
    torch.testing.assert_close(attn(x), hand_written)


@pytest.mark.parametrize("switches", SCHEMES + [dict(n_head=4, n_kv_head=2)])
def test_the_cache_gives_the_logits_of_a_full_forward_at_every_position(switches, device):
    model = seeded_model(device, **switches)
    ids = torch.randint(23, (12,)).tolist()
    full, _ = model(torch.tensor([ids], device=device))  # (1, 12, V)
    with llm.evaluating(model):
        cache = llm.KVCache(model)
        logits = cache.logits_after(model, ids[:5])  # a prefill of five tokens at once
        torch.testing.assert_close(logits, full[:, 4], atol=1e-5, rtol=1e-5)
        logits = cache.logits_after(model, ids[:8])  # three more after cached keys
        torch.testing.assert_close(logits, full[:, 7], atol=1e-5, rtol=1e-5)
        for t in range(9, 13):  # then one token at a time
            logits = cache.logits_after(model, ids[:t])
            torch.testing.assert_close(logits, full[:, t - 1], atol=1e-5, rtol=1e-5)
            assert cache.position == t
        cache.clear()  # a new window (its last half): prefilled again, then stepped
        window = ids[6:]
        full, _ = model(torch.tensor([window], device=device))  # (1, 6, V)
        for t in range(3, 7):
            torch.testing.assert_close(cache.logits_after(model, window[:t]), full[:, t - 1],
                                       atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(torch.tensor([window], device=device))[0], full)  # untouched


def test_the_cache_writes_each_tokens_keys_into_the_slot_of_its_position():
    model = seeded_model(n_head=4, n_kv_head=2)
    ids = torch.randint(23, (9,)).tolist()
    with llm.evaluating(model):
        cache = llm.KVCache(model)
        for t in range(3, 10):  # a prefill of three, then six steps
            cache.logits_after(model, ids[:t])
        x = model.blocks[0].norm1(model.embed(torch.tensor([ids])))  # the first layer's input
        _, k, v = model.blocks[0].attn.heads(x)  # (1, Hkv, 9, D): section 7's, all at once
    assert cache.k[0].shape == (1, 2, 12, 4)  # block_size slots, before grouped heads repeat
    torch.testing.assert_close(cache.k[0][:, :, :9], k, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cache.v[0][:, :, :9], v, atol=1e-6, rtol=1e-5)
    assert (cache.k[0][:, :, 9:] == 0).all()  # slots not reached stay as they were


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_cache_records_one_cuda_graph_per_number_of_fed_tokens():
    model = seeded_model("cuda")
    with llm.evaluating(model):
        cache = llm.KVCache(model)
        ids = [1, 2, 3] + [4] * 20
        for t in range(3, 13):
            cache.logits_after(model, ids[:t])
        cache.clear()
        cache.logits_after(model, ids[6:12])
    assert sorted(cache.graphs) == [1, 3, 6]  # the prompt's 3, one token, a restart's half


@pytest.mark.parametrize("switches", SCHEMES)
def test_fast_generation_writes_what_generate_writes_within_one_window(switches, device):
    model = seeded_model(device, **switches)
    seed = lambda: torch.Generator(device=device).manual_seed(5)  # noqa: E731
    fast = list(llm.generate_fast(model, [1, 2, 3], 9, temperature=1.5, generator=seed()))
    plain = list(llm.generate(model, [1, 2, 3], 9, temperature=1.5, generator=seed()))
    assert fast == plain  # 12 tokens: one window of block_size 12
    assert len(set(fast)) > 3  # a varied text, not one token repeated


@pytest.mark.parametrize("switches", SCHEMES)
def test_past_the_window_each_token_is_the_argmax_of_a_full_forward_on_its_window(switches):
    model = seeded_model(**switches)  # block_size 12
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    new = list(llm.generate_fast(model, prompt, 30, temperature=0))
    ids, start = prompt[:], 0
    for token in new:  # the policy the appendix states: when full, keep the last half
        if len(ids) - start > 12:
            start = len(ids) - 6
        window = torch.tensor([ids[start:]])
        assert model(window)[0][0, -1].argmax().item() == token
        ids.append(token)
    assert start > 12  # several restarts happened


def test_generate_crops_the_context_to_the_last_block_size_tokens(monkeypatch):
    model = seeded_model()
    lengths = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda idx, *a: lengths.append(idx.shape[1]) or real_forward(idx, *a))
    list(llm.generate(model, [1] * 10, 5, temperature=0))
    assert lengths == [10, 11, 12, 12, 12]


def test_bench_prints_every_figure(capsys):
    options = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
               "--device", "cpu", "--steps", "2", "--sample-tokens", "20"]
    assert llm.main(["bench", *options]) == 0
    out = capsys.readouterr().out
    for name in ("training tokens/s", "achieved GFLOP/s", "fraction of matmul peak", "KV cache", "no cache",
                 "peak memory", "parameters", "evaluation s", "evaluation share", "--size cpu"):
        assert name in out
    flops = float(out.split("FLOPs per token (6N + 12LCT)")[1].split()[0])
    cfg = llm.RunConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    expected = 6 * llm.GPT(cfg, 65).num_parameters() + 12 * 1 * 16 * 16  # rope: no position table
    assert flops == pytest.approx(expected / 1e6, abs=0.005)


def test_the_wrapped_model_evaluates_as_section_10_does(device):
    model = seeded_model(device)
    data = torch.randint(23, (500,))
    batches = llm.fixed_batches(data, llm.RunConfig(block_size=12, batch_size=4, eval_iters=3), 0)
    plain = llm.estimate_loss(model, [(x.to(device), y.to(device)) for x, y in batches])
    on_device = llm.evaluation_batches_on({"val": batches}, device)["val"]
    assert all(x.device.type == device.type for x, _ in on_device)
    wrapped = llm.wrap_for_device(model, model.cfg, llm.Distributed(), device)
    loss = llm.estimate_loss(wrapped, on_device)
    if device.type == "cpu":
        assert wrapped is model and loss == plain  # the CPU's evaluation is section 10's
    else:
        assert loss == pytest.approx(plain, abs=0.02)  # bfloat16 on a GPU


def test_each_process_keeps_its_share_of_the_same_batches():
    stream = lambda: iter([(torch.tensor([i]), torch.tensor([i])) for i in range(12)])  # noqa: E731
    for rank in range(3):
        share = llm.process_batches(stream(), llm.Distributed(rank, 3), torch.device("cpu"))
        assert [int(next(share)[0]) for _ in range(4)] == [rank, rank + 3, rank + 6, rank + 9]


@pytest.mark.parametrize("rank, stderr", [
    ("0", "error: --grad-accum-steps (3) must be a multiple of the number of processes (2), so "
          "that each gets an equal share\n"),
    ("1", ""),  # the same error, said once: by rank 0
])
def test_a_share_torchrun_cannot_split_is_one_line_from_rank_0(tmp_path, tiny_text_file,
                                                               monkeypatch, rank, stderr):
    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)  # as torchrun sets them; stopped before any joining
    result = run_main("train", "--data", tiny_text_file, "--out-dir", tmp_path,
                      *TINY_TRAIN_OPTIONS, "--grad-accum-steps", "3")
    assert (result.returncode, result.stderr) == (2, stderr)


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
    cfg = llm.RunConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=20,
                     eval_interval=10, eval_iters=2, device="cuda")
    result = llm.run_training(cfg, TINY_TEXT, tmp_path, log=lambda *_: None)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    optimizer = llm.configure_optimizer(result.model, cfg)
    assert optimizer.defaults["fused"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_train_without_size_says_first_that_it_took_the_gpu_preset(tmp_path, tiny_text_file, capsys):
    options = [o for o in TINY_TRAIN_OPTIONS if o not in ("--device", "cpu")]  # device: auto
    assert llm.main(["train", "--data", str(tiny_text_file), "--out-dir", str(tmp_path), *options]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert "gpu preset" in first_line and "--size cpu" in first_line
    assert llm.load_checkpoint(tmp_path / "ckpt.pt")[0].cfg.block_size == 16  # options win
