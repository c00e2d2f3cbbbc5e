"""Modern components (RoPE, RMSNorm, SwiGLU, grouped-query attention) against references."""
import math

import pytest
import torch
import torch.nn.functional as F

import llm

ALL_ARCHS = list(llm.ARCHITECTURES)


def test_rms_norm_equals_pytorch():
    torch.manual_seed(0)
    norm = llm.RMSNorm(24)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 24) * 4 + 2
    torch.testing.assert_close(norm(x), F.rms_norm(x, (24,), norm.weight, eps=1e-5))


def test_layer_norm_without_bias_equals_pytorch():
    torch.manual_seed(0)
    norm = llm.LayerNorm(16, bias=False)
    x = torch.randn(2, 3, 16)
    assert norm.bias is None
    torch.testing.assert_close(norm(x), F.layer_norm(x, (16,), norm.weight, None, eps=1e-5))


def test_swiglu_equals_its_formula_with_pytorch_silu():
    torch.manual_seed(0)
    cfg = llm.RunConfig(n_embd=24, mlp="swiglu", bias=True)
    mlp = llm.SwiGLU(cfg)
    x = torch.randn(2, 5, 24)
    w_gate, w_up = mlp.gate_up.weight.split(64)  # the two stacked (8C/3, C) matrices
    b_gate, b_up = mlp.gate_up.bias.split(64)
    expected = mlp.proj(F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up))
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.gate_up.out_features == 2 * (8 * 24 // 3) == 2 * 64


def test_swiglu_has_about_the_parameters_of_the_gelu_mlp():
    cfg = llm.RunConfig(n_embd=384, bias=False)
    gelu = sum(p.numel() for p in llm.MLP(cfg).parameters())
    swiglu = sum(p.numel() for p in llm.SwiGLU(cfg).parameters())
    assert gelu == 8 * 384 * 384 and swiglu == 3 * 384 * 1024 == gelu  # 8C/3 is exact when 3 | C


# --- RoPE ----------------------------------------------------------------------------------------

def rope_by_formula(x, angles):
    """An independent formulation: each channel pair (a, b) times the 2 x 2 rotation matrix,
    (a cos - b sin, a sin + b cos), in float64 and written out with explicit sin and cos."""
    a, b = x[..., 0::2].double(), x[..., 1::2].double()  # (..., T, D/2)
    cos, sin = angles.double().cos(), angles.double().sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).float()


def rope_complex(x, angles):
    """A second independent formulation: pairs as complex numbers a + ib, times e^(i*angle)."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles.double()), angles.double())).flatten(-2).float()


def test_rope_tables_hold_each_pairs_angle_twice_with_the_sign_of_the_formula():
    cos, sin = llm.rope_tables(10, 16)
    angles = llm.position_angles(10, 16)  # (10, 8)
    assert cos.shape == sin.shape == (10, 16)
    torch.testing.assert_close(cos[:, 0::2], angles.cos())
    torch.testing.assert_close(cos[:, 1::2], angles.cos())
    torch.testing.assert_close(sin[:, 0::2], -angles.sin())
    torch.testing.assert_close(sin[:, 1::2], angles.sin())


@pytest.mark.parametrize("reference", [rope_by_formula, rope_complex])
def test_rope_equals_the_rotation_formula_and_complex_multiplication(reference):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 16)  # (B, H, T, D)
    torch.testing.assert_close(llm.rope_rotate(x, *llm.rope_tables(10, 16)),
                               reference(x, llm.position_angles(10, 16)))


def test_rope_keeps_the_dtype_of_its_input():
    x = torch.randn(3, 8, 16, dtype=torch.bfloat16)  # what autocast hands it on a GPU
    rotated = llm.rope_rotate(x, *llm.rope_tables(8, 16))
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated, rope_by_formula(x.float(), llm.position_angles(8, 16)).bfloat16())


def test_rope_preserves_vector_norms():
    torch.manual_seed(0)
    x = torch.randn(4, 50, 32)
    rotated = llm.rope_rotate(x, *llm.rope_tables(50, 32))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("m, n, shift", [(10, 3, 7), (5, 5, 40), (0, 20, 13)])
def test_rope_score_depends_only_on_the_relative_offset(m, n, shift):
    torch.manual_seed(0)
    q, k = torch.randn(2, 32)
    cos, sin = llm.rope_tables(100, 32)

    def score(i, j):
        return llm.rope_rotate(q, cos[i], sin[i]) @ llm.rope_rotate(k, cos[j], sin[j])

    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(m, n), score(m + shift, n), atol=1e-3)  # a real dependence


# --- grouped-query attention -----------------------------------------------------------------

@pytest.mark.parametrize("n_kv_head, kv_head, query_heads", [
    (0, 2, [2]), (4, 2, [2]),  # plain multi-head attention: each query head has its own keys
    (2, 1, [2, 3]), (1, 0, [0, 1, 2, 3]),  # grouped: a key head serves its group of query heads
])
def test_a_key_head_serves_exactly_its_group_of_query_heads(n_kv_head, kv_head, query_heads):
    torch.manual_seed(0)
    attn = llm.MultiHeadAttention(llm.RunConfig(n_embd=32, n_head=4, n_kv_head=n_kv_head))
    x = torch.randn(2, 7, 32)
    heads = []  # each head's output, (B, T, H, D): what goes into the output projection
    attn.proj.register_forward_pre_hook(lambda _, args: heads.append(args[0].view(2, 7, 4, 8)))
    with torch.no_grad():
        attn(x)
        attn.qkv.weight[32 + kv_head * 8:32 + (kv_head + 1) * 8] *= 3  # that key head's rows
        attn(x)
    before, after = heads
    changed = [h for h in range(4) if not torch.allclose(before[:, 1:, h], after[:, 1:, h])]
    assert changed == query_heads  # (position 0 attends to itself alone: it never changes)


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_attention_equals_pytorch_on_repeated_keys_and_values(n_kv_head):
    torch.manual_seed(0)
    cfg = llm.RunConfig(n_embd=32, n_head=4, n_kv_head=n_kv_head, pos_encoding="learned")
    attn = llm.MultiHeadAttention(cfg)
    assert attn.qkv.out_features == 32 + 2 * n_kv_head * 8
    x = torch.randn(2, 9, 32)
    B, T, C = x.shape
    q, k, v = attn.qkv(x).split([C, n_kv_head * 8, n_kv_head * 8], dim=-1)
    q = q.view(B, T, 4, 8).transpose(1, 2)
    k, v = (t.view(B, T, n_kv_head, 8).transpose(1, 2) for t in (k, v))
    group = 4 // n_kv_head
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                       is_causal=True)
    y_gqa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # PyTorch's own GQA
    torch.testing.assert_close(y, y_gqa)
    torch.testing.assert_close(attn(x), attn.proj(y.transpose(1, 2).reshape(B, T, C)))


def test_rope_attention_equals_pytorch_on_rotated_queries_and_keys():
    torch.manual_seed(0)
    attn = llm.MultiHeadAttention(llm.RunConfig(n_embd=32, n_head=4, n_kv_head=0, pos_encoding="rope"))
    x = torch.randn(2, 9, 32)
    B, T, C = x.shape
    q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in attn.qkv(x).split(C, dim=-1))
    angles = llm.position_angles(T, 8)
    y = F.scaled_dot_product_attention(rope_by_formula(q, angles), rope_by_formula(k, angles), v, is_causal=True)
    torch.testing.assert_close(attn(x), attn.proj(y.transpose(1, 2).reshape(B, T, C)))


# --- whole models, every preset ----------------------------------------------------------------

def expected_parameter_count(cfg, vocab_size):
    """Counted by hand from the architecture's switches."""
    C, D = cfg.n_embd, cfg.n_embd // cfg.n_head
    kv = cfg.kv_heads * D
    b = 1 if cfg.bias else 0
    attention = C * (C + 2 * kv) + b * (C + 2 * kv) + C * C + b * C
    if cfg.mlp in ("gelu", "gelu_tanh"):  # exact or tanh formula: the same matrices
        mlp = 2 * 4 * C * C + b * (4 * C + C)
    else:
        hidden = 8 * C // 3
        mlp = 3 * C * hidden + b * (2 * hidden + C)
    norm = C if cfg.norm == "rmsnorm" else C + b * C
    positions = cfg.block_size * C if cfg.pos_encoding == "learned" else 0
    return vocab_size * C + positions + cfg.n_layer * (attention + mlp + 2 * norm) + norm


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_parameter_counts_per_preset(arch):
    cfg = llm.preset(arch)
    count = llm.GPT(cfg, 65).num_parameters()
    print(f"{arch}: {count:,} parameters")
    assert count == expected_parameter_count(cfg, 65)
    assert count == {"gpt2": 809_856, "llama": 729_856}[arch]  # the numbers the notebook prints


@pytest.mark.parametrize("overrides", [
    {"pos_encoding": "rope"}, {"norm": "rmsnorm"}, {"mlp": "swiglu"}, {"n_kv_head": 1}, {"bias": False},
    {"pos_encoding": "sinusoidal", "mlp": "swiglu", "n_kv_head": 2, "bias": False},
])
def test_parameter_count_of_mixed_switches(overrides):
    cfg = llm.RunConfig(n_embd=48, n_head=4, n_layer=2, **overrides)
    assert llm.GPT(cfg, 30).num_parameters() == expected_parameter_count(cfg, 30)


# every preset, and the one positional scheme no preset uses
MODELS = [(arch, {}) for arch in ALL_ARCHS] + [("gpt2", {"pos_encoding": "sinusoidal"})]


@pytest.mark.parametrize("arch, switches", MODELS)
def test_causality_future_tokens_do_not_change_past_logits(arch, switches, device):
    cfg = llm.preset(arch, n_layer=2, n_head=4, n_embd=32, block_size=16, **switches)
    torch.manual_seed(0)
    model = llm.GPT(cfg, 20).to(device).eval()
    idx = torch.randint(20, (2, 16), device=device)
    changed = idx.clone()
    changed[:, 10:] = (idx[:, 10:] + 1) % 20
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])  # the future did change


@pytest.mark.parametrize("arch, switches", MODELS)
def test_loss_at_init_is_close_to_ln_vocab_size(arch, switches):
    llm.set_seed(0)
    model = llm.GPT(llm.preset(arch, **switches), 65)
    _, loss = model(torch.randint(65, (8, 64)), torch.randint(65, (8, 64)))
    assert abs(loss.item() - math.log(65)) < 0.3


def test_default_config_is_the_default_preset():
    assert llm.RunConfig() == llm.preset(llm.DEFAULT_ARCH)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(llm.UserError, match="--arch"):
        llm.preset("gpt5")


@pytest.mark.parametrize("overrides, fragment", [
    ({"n_head": 4, "n_kv_head": 3}, "multiple of --n-kv-head"),
    ({"n_embd": 12, "n_head": 4, "pos_encoding": "rope"}, "even"),
    ({"norm": "batchnorm"}, "--norm"),
    ({"mlp": "relu"}, "--mlp"),
])
def test_invalid_switches(overrides, fragment):
    with pytest.raises(llm.UserError, match=fragment):
        llm.validate_config(llm.RunConfig(**overrides))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_checkpoint_round_trip_records_the_architecture(tmp_path, arch):
    cfg = llm.preset(arch, n_layer=1, n_head=4, n_embd=16, block_size=8, device="cpu")
    tok = llm.CharTokenizer.from_text("abcdef")
    llm.set_seed(0)
    model = llm.GPT(cfg, tok.vocab_size)
    path = tmp_path / "ckpt.pt"
    llm.save_checkpoint(path, llm.Run(cfg, model, llm.configure_optimizer(model, cfg), torch.Generator(),
                                      tok, "", best_val=1.0))
    loaded, _, checkpoint = llm.load_checkpoint(path)
    assert loaded.cfg == cfg and checkpoint["config"]["norm"] == cfg.norm
    assert checkpoint["step"] == 0 and checkpoint["val_loss"] == 1.0
    idx = torch.randint(tok.vocab_size, (1, 8))
    torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0])
    for generate_ids in (llm.generate, llm.generate_fast):  # sampling works, past block_size too
        assert len(llm.generate_text(loaded, tok, "abc", 12, generate_ids=generate_ids)) == 15


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_model_buffers_are_real_numbers(arch):
    # DDP copies every buffer from the first process to the others when it starts; on GPUs it does
    # so through NCCL, which has no complex type. So no buffer may be complex.
    model = llm.GPT(llm.preset(arch), 65)
    assert all(buffer.is_floating_point() for buffer in model.buffers())
