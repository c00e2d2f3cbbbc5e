"""The sampling functions and generation."""
import pytest
import torch

import llm

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def kept(logits):
    return int(torch.isfinite(logits).sum())


def test_temperature_zero_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 30)
    assert torch.equal(llm.sample_next(logits, temperature=0), logits.argmax(-1))


def test_top_k_one_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(5, 30)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        assert torch.equal(llm.sample_next(logits, temperature=1.5, top_k=1, generator=g), logits.argmax(-1))


def test_top_k_keeps_k_tokens():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0])
    filtered = llm.top_k_filter(logits, 2)
    assert torch.isfinite(filtered).tolist() == [False, True, True, False, False]


@pytest.mark.parametrize("p, expected", [(0.6, 2), (0.85, 3), (0.5, 1), (1.0, 4), (0.01, 1)])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(llm.top_p_filter(PROBS.log(), p)) == expected


def test_top_p_works_in_any_vocabulary_order():
    order = torch.tensor([2, 0, 3, 1])
    filtered = llm.top_p_filter(PROBS.log()[order], 0.6)
    assert torch.isfinite(filtered).tolist() == [False, True, False, True]  # tokens of p 0.5 and 0.3


def test_top_p_always_keeps_at_least_one_token():
    logits = torch.tensor([10.0, 0.0, 0.0])  # first token has almost all the mass
    assert kept(llm.top_p_filter(logits, 1e-9)) == 1


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.5}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5},
    {"top_k": 0}, {"top_k": 5},  # 5 > the vocabulary of 4
])
def test_bad_sampling_arguments_raise_value_error(kwargs):
    args = {"temperature": 1.0, "top_k": None, "top_p": None, **kwargs}
    with pytest.raises(ValueError):  # a UserError, which is a ValueError
        llm.check_sampling_args(args["temperature"], args["top_k"], args["top_p"], vocab_size=4)
    llm.set_seed(0)
    model = llm.GPT(llm.RunConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, device="cpu"), len(PROBS))
    for generate_ids in (llm.generate, llm.generate_fast):
        with pytest.raises(llm.UserError):  # when the first token is asked for
            next(generate_ids(model, [1, 2], 3, **kwargs))
    llm.check_sampling_args(1.0, 4, 1.0, vocab_size=4)  # the limits themselves are allowed


def test_sampling_follows_the_distribution():
    g = torch.Generator().manual_seed(0)
    draws = llm.sample_next(PROBS.log().expand(20_000, 4), generator=g)
    freq = torch.bincount(draws, minlength=4) / 20_000
    torch.testing.assert_close(freq, PROBS, atol=0.015, rtol=0)


@pytest.fixture
def tiny_model(tiny_cfg, device):
    llm.set_seed(0)
    tok = llm.CharTokenizer.from_text("abcdefghij\n")
    return llm.GPT(tiny_cfg, tok.vocab_size).to(device), tok


@pytest.mark.parametrize("generate_ids", [llm.generate, llm.generate_fast])
def test_generate_is_seeded_and_runs_past_block_size(tiny_model, generate_ids):
    model, tok = tiny_model
    a = llm.generate_text(model, tok, "abc", 40, seed=3, generate_ids=generate_ids)  # 43 > block_size of 16: cropped
    b = llm.generate_text(model, tok, "abc", 40, seed=3, generate_ids=generate_ids)
    c = llm.generate_text(model, tok, "abc", 40, seed=4, generate_ids=generate_ids)
    assert a == b and a != c
    assert a.startswith("abc") and len(a) == 43


@pytest.mark.parametrize("generate_ids", [llm.generate, llm.generate_fast])
def test_greedy_generation_matches_argmax_of_the_full_forward(tiny_model, generate_ids):
    model, tok = tiny_model
    ids = tok.encode("abc")
    new = list(generate_ids(model, ids, 5, temperature=0))
    assert len(new) == 5
    model.eval()
    for token in new:
        logits, _ = model(torch.tensor([ids], device=model.device))
        assert logits[0, -1].argmax().item() == token
        ids.append(token)


@pytest.mark.parametrize("generate_ids", [llm.generate, llm.generate_fast])
def test_generate_restores_the_previous_mode(tiny_model, generate_ids):
    model, tok = tiny_model
    model.train()
    list(generate_ids(model, tok.encode("a"), 3))
    assert model.training
    model.eval()
    list(generate_ids(model, tok.encode("a"), 3))
    assert not model.training


@pytest.mark.parametrize("generate_ids", [llm.generate, llm.generate_fast])
def test_a_paused_generator_leaks_no_mode_to_the_caller(tiny_model, generate_ids):
    model, tok = tiny_model
    model.train()
    tokens = generate_ids(model, tok.encode("ab"), 5)
    next(tokens)  # paused between tokens
    assert model.training and not torch.is_inference_mode_enabled()
    _, loss = model(torch.tensor([[1, 2, 3]], device=model.device),
                    torch.tensor([[2, 3, 4]], device=model.device))
    loss.backward()  # training still works while the generator waits


@pytest.mark.parametrize("generate_ids", [llm.generate, llm.generate_fast])
def test_generation_with_a_context_of_one_token(generate_ids, device):
    llm.set_seed(0)
    model = llm.GPT(llm.RunConfig(n_layer=1, n_head=2, n_embd=8, block_size=1), 5).to(device)
    assert len(list(generate_ids(model, [1, 2, 3], 6))) == 6
