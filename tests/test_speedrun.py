"""Appendix I, the speedrun: Newton-Schulz against the SVD, Muon's parameter groups, each trick
against what it replaces, the cache and exact resume with the tricks, and the two recipes."""
import pytest
import torch
import torch.nn.functional as F

import llm
from conftest import (TINY_TEXT, TINY_TRAIN_OPTIONS, assert_one_clear_line, interrupt_when, losses,
                      quiet, run_main, tiny_run_cfg)

ALL_TRICKS = ",".join(llm.MODEL_TRICKS)


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 128)])
def test_newton_schulz_is_close_to_the_orthogonal_factor_of_the_svd(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[:3] *= 8 if shape[0] < shape[1] else 1  # a few strong directions, as in real gradients
    g[:, :3] *= 1 if shape[0] < shape[1] else 8
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    o = llm.newton_schulz(g)
    strengths = torch.linalg.svdvals(o)
    assert o.shape == g.shape
    assert strengths.min() > 0.6 and strengths.max() < 1.25  # every strength near 1
    exact = u @ vt
    assert (o * exact).sum() / (o.norm() * exact.norm()) > 0.95  # the same directions
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 10  # (it had work)


def test_a_strength_far_below_the_norm_stays_small_in_five_steps():
    g = torch.diag(torch.tensor([1.0, 0.5, 1e-6]))  # the norm is about 1.1
    strengths = torch.linalg.svdvals(llm.newton_schulz(g))
    assert strengths[:2].min() > 0.6 and strengths[2] < 0.01  # grows 3.4 times a step only


def test_more_newton_schulz_steps_do_not_leave_the_band_around_one():
    g = torch.randn(48, 80, generator=torch.Generator().manual_seed(1))
    for steps in (5, 8, 12):
        strengths = torch.linalg.svdvals(llm.newton_schulz(g, steps))
        assert 0.6 < strengths.min() and strengths.max() < 1.25


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else_exactly_once():
    cfg = tiny_run_cfg(optimizer="muon", tricks="untied_head,qk_norm")
    model = llm.build_model(cfg, 30)
    optimizer = llm.build_optimizer(model, cfg)
    muon, adamw = optimizer.optimizers
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    adamw_params = [p for g in adamw.param_groups for p in g["params"]]
    ids = [id(p) for p in muon_params + adamw_params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each once, none left out
    block_matrices = {id(p) for p in model.blocks.parameters() if p.dim() == 2}
    assert {id(p) for p in muon_params} == block_matrices
    assert id(model.embed.token.weight) in {id(p) for p in adamw_params}
    assert id(model.lm_head.weight) in {id(p) for p in adamw_params}
    decayed = [p for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert all(p.dim() == 2 for p in decayed)  # norms' gains are not decayed


def test_each_parameter_changes_in_a_muon_step_and_the_lr_reaches_both_optimizers():
    cfg = tiny_run_cfg(optimizer="muon", dropout=0.0)
    model = llm.build_model(cfg, 30)
    optimizer = llm.build_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(30, (4, 16), generator=torch.Generator().manual_seed(0))
    llm.train_step(model, optimizer, [(x, x)], lr=1e-3)
    assert all(g["lr"] == 1e-3 for opt in optimizer.optimizers for g in opt.param_groups)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_muon_update_has_the_size_of_an_adamw_one():
    weight = torch.nn.Parameter(torch.zeros(32, 96))
    weight.grad = torch.randn(32, 96)
    llm.Muon([weight], lr=1.0, momentum=0.0).step()
    rms = weight.detach().pow(2).mean().sqrt()
    assert 0.15 < rms < 0.25  # about 0.2 whatever the gradient's scale


def test_fused_kernels_equal_part_i_modules():
    torch.manual_seed(0)
    cfg = llm.ModelConfig(n_embd=24)
    x = torch.randn(2, 5, 24)
    norm, swiglu = llm.RMSNorm(24), llm.SwiGLU(cfg)
    torch.nn.init.normal_(norm.weight)
    expected = norm(x), swiglu(x)
    llm.swap_forward(norm, {llm.RMSNorm: llm.FusedRMSNorm})
    llm.swap_forward(swiglu, {llm.SwiGLU: llm.FusedSwiGLU})
    assert type(norm) is llm.FusedRMSNorm and type(swiglu) is llm.FusedSwiGLU
    torch.testing.assert_close(norm(x), expected[0])
    torch.testing.assert_close(swiglu(x), expected[1])


def test_bf16_linear_is_the_float32_product_to_bfloat16_precision():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    batch, few = torch.randn(4, 64, 64), torch.randn(1, 3, 64)  # 256 vectors, and 3
    expected = linear(batch), linear(few)
    llm.swap_forward(linear, {torch.nn.Linear: llm.BF16Linear})
    out = linear(batch)
    assert out.dtype == torch.float32 and not torch.equal(out, expected[0])
    torch.testing.assert_close(out, expected[0], atol=0.05, rtol=0.02)
    assert torch.equal(linear(few), expected[1])  # a few vectors (sampling): float32 exactly
    out.sum().backward()
    assert linear.weight.grad.dtype == torch.float32


def test_qk_norm_normalises_queries_and_keys_and_leaves_values():
    cfg = llm.ModelConfig(n_embd=32, n_head=4, n_kv_head=2)
    model = llm.GPT(cfg, 20)
    llm.qk_norm(model, cfg)
    attn = model.blocks[0].attn
    x = torch.randn(2, 6, 32)
    heads = attn.qkv(x).unflatten(-1, (-1, 8))  # (B, T, H + 2Hkv, D)
    rms = heads.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms[..., :6], torch.ones(2, 6, 6), atol=1e-3, rtol=0)  # q and k
    torch.testing.assert_close(heads[..., 6:, :], attn.qkv.qkv(x).unflatten(-1, (-1, 8))[..., 6:, :])


def test_soft_cap_bounds_the_logits_and_keeps_small_ones():
    head = torch.nn.Linear(4, 3, bias=False)
    capped = llm.SoftCap(head, cap=15.0)
    big, small = torch.full((1, 4), 1000.0), torch.full((1, 4), 0.01)
    assert capped(big).abs().max() <= 15.0 and head(big).abs().max() > 100
    torch.testing.assert_close(capped(small), head(small), atol=1e-5, rtol=1e-4)


def test_tricks_that_add_or_untie_follow_section_9s_initialisation():
    cfg = llm.ModelConfig()
    model = llm.GPT(cfg, 65)
    llm.untied_head(model, cfg)
    llm.zero_projections(model, cfg)
    assert model.lm_head.weight is not model.embed.token.weight
    assert 0.015 < model.lm_head.weight.std() < 0.025
    assert all(b.attn.proj.weight.abs().max() == 0 and b.mlp.proj.weight.abs().max() == 0
               for b in model.blocks)


@pytest.mark.parametrize("tricks", [ALL_TRICKS, "qk_norm", "soft_cap,untied_head"])
def test_the_cache_gives_the_full_forward_logits_with_the_tricks(tricks, device):
    llm.set_seed(0)
    cfg = llm.RunConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=16, block_size=12, tricks=tricks)
    model = llm.build_model(cfg, 23).to(device).eval()
    ids = torch.randint(23, (12,)).tolist()
    full, _ = model(torch.tensor([ids], device=device))
    with llm.evaluating(model):
        cache = llm.KVCache(model)
        for t in (5, 8, 9, 12):
            torch.testing.assert_close(cache.logits_after(model, ids[:t]), full[:, t - 1],
                                       atol=1e-5, rtol=1e-5)


def test_resume_with_muon_and_every_trick_is_bit_identical(tmp_path):
    def cfg():
        return tiny_run_cfg(optimizer="muon", tricks=ALL_TRICKS)

    straight = llm.run_training(cfg(), TINY_TEXT, tmp_path / "straight", log=quiet)
    with pytest.raises(llm.Interrupted, match="--resume"):
        llm.run_training(cfg(), TINY_TEXT, tmp_path / "resumed",
                         log=interrupt_when(lambda line: line.startswith("step    10/")))
    checkpoint = torch.load(tmp_path / "resumed" / "latest.pt", weights_only=True)
    assert checkpoint["step"] == 10 and checkpoint["config"]["tricks"] == ALL_TRICKS
    assert checkpoint["optimizer"]["optimizers"][0]["state"]  # Muon's momentum is saved
    resumed = llm.run_training(cfg(), TINY_TEXT, tmp_path / "resumed", log=quiet, resume=True)
    assert losses(resumed.history) == losses(straight.history)  # exact: not approximately
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_train_says_its_recipe_first_and_the_checkpoint_keeps_its_tricks(tmp_path, tiny_text_file):
    result = run_main("train", "--data", tiny_text_file, "--out-dir", tmp_path, *TINY_TRAIN_OPTIONS)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("recipe speedrun: --optimizer muon --tricks fused") and "--recipe plain" in first
    cfg = llm.load_checkpoint(tmp_path / "ckpt.pt")[0].cfg
    assert cfg.tricks.startswith("fused") and cfg.tricks == first.split()[5]
    assert "--max-iters 20" in first  # the options given on top of the recipe show


def test_recipe_plain_is_part_i_recipe(tmp_path, tiny_text_file):
    result = run_main("train", "--data", tiny_text_file, "--out-dir", tmp_path, "--recipe", "plain",
                      *TINY_TRAIN_OPTIONS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("recipe plain: --optimizer adamw --tricks none")
    assert result.stdout.splitlines()[0].endswith("(Part I's)")
    model = llm.load_checkpoint(tmp_path / "ckpt.pt")[0]
    assert (model.cfg.tricks, model.cfg.optimizer) == ("", "adamw") and type(model) is llm.GPT
    assert model.lm_head.weight is model.embed.token.weight  # section 9's tied model, untouched
    plain = llm.preset(llm.DEFAULT_ARCH, "cpu", **llm.RECIPES["plain"])
    part_i = llm.Config()
    assert all(getattr(plain, f.name) == getattr(part_i, f.name)
               for f in llm.dataclasses.fields(llm.Config))


def test_recipe_mistakes_are_one_clear_line(tmp_path, tiny_text_file):
    base = ["train", "--data", tiny_text_file, "--out-dir", tmp_path, *TINY_TRAIN_OPTIONS]
    assert_one_clear_line(run_main(*base, "--tricks", "fused,turbo"), "--tricks", "'turbo'",
                          "qk_norm")
    assert_one_clear_line(run_main(*base, "--optimizer", "sgd"), "--optimizer", "muon")
    assert run_main(*base).returncode == 0
    assert_one_clear_line(run_main("train", "--out-dir", tmp_path, "--resume", "--recipe",
                                   "plain"), "--recipe")


@pytest.mark.parametrize("speedup, with_bf16", [(4.0, True), (1.3, False)])
def test_bfloat16_products_only_where_the_probe_finds_them_fast(monkeypatch, speedup, with_bf16):
    monkeypatch.setattr(llm, "bf16_speedup", lambda: speedup)
    settings, note = llm.recipe_settings("speedrun", torch.device("cpu"))
    assert ("bf16" in llm.trick_names(llm.RunConfig(**settings))) == with_bf16
    assert f"{speedup:.1f}x" in note and ("not used" in note) != with_bf16
    assert llm.recipe_settings("speedrun", torch.device("cuda"))[0]["tricks"] == "fused"
    assert llm.recipe_settings("plain", torch.device("cpu"))[0] == {}
