"""The model's pieces against PyTorch's own implementations, and properties of the whole."""
import math

import pytest
import torch
import torch.nn.functional as F

import llm
from conftest import TINY_TEXT


def test_softmax_equals_pytorch():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 30) * 3
    torch.testing.assert_close(llm.softmax(logits), F.softmax(logits, -1))
    torch.testing.assert_close(llm.softmax(logits).sum(-1), torch.ones(4, 6))


@pytest.mark.parametrize("offset", [1000.0, -1000.0])
def test_softmax_of_large_logits_does_not_overflow(offset):
    torch.manual_seed(0)
    logits = torch.randn(5, 30) + offset  # exp(1000) is inf in float32: a naive softmax gives nan
    assert not torch.isfinite(logits.exp() / logits.exp().sum(-1, keepdim=True)).all()
    probs = llm.softmax(logits)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs, F.softmax(logits, -1))
    wide = torch.randn(5, 30) * 1000  # scores far apart: most probabilities round to 0
    torch.testing.assert_close(llm.softmax(wide), F.softmax(wide, -1))


def test_cross_entropy_equals_pytorch():
    torch.manual_seed(0)
    logits = (torch.randn(50, 20) * 3).requires_grad_()
    targets = torch.randint(20, (50,))
    ours = llm.cross_entropy(logits, targets)
    theirs = F.cross_entropy(logits, targets)
    assert ours.shape == theirs.shape == ()
    torch.testing.assert_close(ours, theirs)
    grad_ours, = torch.autograd.grad(ours, logits)
    grad_theirs, = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(grad_ours, grad_theirs)


@pytest.mark.parametrize("scale, offset", [(1.0, 1000.0), (1.0, -1000.0), (1000.0, 0.0)])
def test_cross_entropy_of_large_logits_stays_finite_and_equals_pytorch(scale, offset):
    torch.manual_seed(0)
    logits = torch.randn(40, 20) * scale + offset
    targets = torch.randint(20, (40,))
    loss = llm.cross_entropy(logits, targets)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    if scale > 1:  # targets of (rounded) probability 0: -ln 0 would be inf, the loss stays finite
        assert (F.softmax(logits, -1)[torch.arange(40), targets] == 0).any()


def test_layer_norm_equals_pytorch():
    torch.manual_seed(0)
    ln = llm.LayerNorm(32)
    with torch.no_grad():  # random gain and bias, so they are really used
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(4, 7, 32) * 3 + 1
    expected = F.layer_norm(x, (32,), ln.weight, ln.bias, eps=1e-5)
    torch.testing.assert_close(ln(x), expected, rtol=1e-5, atol=1e-5)


def test_sinusoidal_positions_follow_the_formula():
    pe = llm.sinusoidal_positions(10, 8)
    for p in range(10):
        for i in range(4):
            angle = p / 10000 ** (2 * i / 8)
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_causal_attention_equals_scaled_dot_product_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 9, 8)  # (B=2, H=4, T=9, D=8) each
    out, _ = llm.causal_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_single_head_equals_scaled_dot_product_attention():
    torch.manual_seed(0)
    head = llm.Head(n_embd=16, head_dim=4)
    x = torch.randn(2, 6, 16)
    out, _ = head(x)
    expected = F.scaled_dot_product_attention(head.query(x), head.key(x), head.value(x), is_causal=True)
    torch.testing.assert_close(out, expected)


def test_multi_head_attention_equals_pytorch_with_the_same_projections():
    torch.manual_seed(0)
    cfg = llm.preset("gpt2", n_embd=32, n_head=4)
    mha = llm.MultiHeadAttention(cfg)
    x = torch.randn(3, 10, 32)
    B, T, C = x.shape
    q, k, v = mha.qkv(x).split(C, dim=-1)
    q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = mha.proj(y.transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(mha(x), expected)


def test_attention_rows_sum_to_one_and_masked_weights_are_exactly_zero():
    torch.manual_seed(0)
    mha = llm.MultiHeadAttention(llm.RunConfig(n_embd=16, n_head=2))
    weights = llm.attention_weights(mha, torch.randn(2, 7, 16))  # (B, H, T, T)
    assert weights.shape == (2, 2, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 7))
    future = llm.causal_mask(7)
    assert (weights[..., future] == 0).all()
    assert (weights[..., ~future] > 0).all()


def test_weight_tying_shares_one_tensor_also_after_save_and_load(tmp_path, tiny_cfg):
    tok = llm.CharTokenizer.from_text("abcdefgh")
    model = llm.GPT(tiny_cfg, tok.vocab_size)
    assert model.lm_head.weight is model.embed.token.weight
    optimizer = llm.configure_optimizer(model, tiny_cfg)
    path = tmp_path / "ckpt.pt"
    llm.save_checkpoint(path, llm.Run(tiny_cfg, model, optimizer, torch.Generator(), tok, ""))
    loaded, _, _ = llm.load_checkpoint(path)
    assert loaded.lm_head.weight is loaded.embed.token.weight
    torch.testing.assert_close(loaded.embed.token.weight, model.embed.token.weight)
    with torch.no_grad():  # a change through one name is seen through the other
        loaded.embed.token.weight[0, 0] = 123.0
    assert loaded.lm_head.weight[0, 0].item() == 123.0


def test_eval_mode_is_deterministic_with_dropout(tiny_cfg, device):
    tiny_cfg.dropout = 0.5
    torch.manual_seed(0)
    model = llm.GPT(tiny_cfg, 20).to(device)
    idx = torch.randint(20, (2, 16), device=device)
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])  # dropout is active in training
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_residual_projections_are_scaled_at_init():
    llm.set_seed(0)
    cfg = llm.preset("gpt2", n_layer=8, n_embd=256)
    model = llm.GPT(cfg, 65)
    std = model.blocks[0].mlp.proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_optimizer_decays_matrices_only(tiny_cfg):
    model = llm.GPT(tiny_cfg, 20)
    decay_group, no_decay_group = llm.configure_optimizer(model, tiny_cfg).param_groups
    assert all(p.dim() == 2 for p in decay_group["params"]) and decay_group["weight_decay"] > 0
    assert all(p.dim() == 1 for p in no_decay_group["params"]) and no_decay_group["weight_decay"] == 0
    assert len(decay_group["params"]) + len(no_decay_group["params"]) == len(list(model.parameters()))


def test_learning_rate_schedule():
    cfg = llm.RunConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lrs = [llm.lr_at(s, cfg) for s in range(cfg.max_iters)]
    assert lrs[0] == pytest.approx(1e-4)  # warmup starts at 1/warmup_iters of the peak
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rises during warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises afterwards
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2)  # halfway through the cosine
    assert llm.lr_at(cfg.max_iters, cfg) == pytest.approx(1e-4)


def test_a_tiny_model_overfits_one_batch(tiny_cfg, device):
    llm.set_seed(0)
    tiny_cfg.learning_rate, tiny_cfg.warmup_iters, tiny_cfg.max_iters = 1e-2, 1, 200
    model = llm.GPT(tiny_cfg, 20).to(device)
    optimizer = llm.configure_optimizer(model, tiny_cfg)
    x, y = llm.get_batch(torch.randint(20, (200,)), 16, 4, torch.Generator().manual_seed(0))
    x, y = x.to(device), y.to(device)
    losses = [llm.train_step(model, optimizer, [(x, y)], 1e-2, tiny_cfg.grad_clip) for _ in range(200)]
    assert losses[0] > 2.5
    assert losses[-1] < 0.1


def test_the_training_loop_yields_each_evaluation_and_each_step_in_order(tiny_cfg):
    tiny_cfg.max_iters, tiny_cfg.eval_interval, tiny_cfg.eval_iters, tiny_cfg.warmup_iters = 7, 3, 2, 2
    corpus = llm.encode_corpus(TINY_TEXT, llm.CharTokenizer.from_text(TINY_TEXT), tiny_cfg.block_size)
    llm.set_seed(0)
    model = llm.GPT(tiny_cfg, corpus.tokenizer.vocab_size)
    batches = llm.random_batches(corpus.train_data, tiny_cfg, torch.Generator().manual_seed(0))
    rows = list(llm.train(model, llm.configure_optimizer(model, tiny_cfg), tiny_cfg, batches,
                          llm.evaluation_batches(corpus.train_data, corpus.val_data, tiny_cfg)))
    kinds = [("evaluation" if "val_loss" in row else "step", row["step"]) for row in rows]
    expected = [("evaluation", 0)]
    for step in range(1, 8):
        expected.append(("step", step))
        if step % 3 == 0 or step == 7:
            expected.append(("evaluation", step))
    assert kinds == expected  # an evaluation at 0, 3, 6 and the last step; a row per step
    assert all(math.isfinite(row["loss"]) for row in rows if "loss" in row)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]


def test_a_run_continues_from_its_step(tiny_cfg):
    tiny_cfg.max_iters, tiny_cfg.eval_interval, tiny_cfg.eval_iters = 6, 2, 1
    data = torch.randint(20, (300,))
    model = llm.GPT(tiny_cfg, 20)
    batches = llm.random_batches(data, tiny_cfg, torch.Generator().manual_seed(0))
    rows = list(llm.train(model, llm.configure_optimizer(model, tiny_cfg), tiny_cfg, batches,
                          llm.evaluation_batches(data, data, tiny_cfg), step=4))
    assert [row["step"] for row in rows] == [4, 5, 6, 6]  # evaluate at 4, two steps, evaluate


def test_model_rejects_sequences_longer_than_block_size(tiny_cfg):
    model = llm.GPT(tiny_cfg, 20)
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly block_size positions are fine
    with pytest.raises(AssertionError, match="block_size"):  # a bug in the caller: an invariant
        model(torch.zeros(1, 17, dtype=torch.long))


def test_config_validation():
    with pytest.raises(llm.UserError, match="divisible"):
        llm.validate_config(llm.RunConfig(n_embd=30, n_head=4))
    with pytest.raises(llm.UserError, match="block-size"):
        llm.validate_config(llm.RunConfig(block_size=0))
    with pytest.raises(llm.UserError, match="learning-rate"):
        llm.validate_config(llm.RunConfig(learning_rate=float("nan")))
    llm.validate_config(llm.RunConfig())  # the defaults are valid
