"""Appendix H: GPT-2's weights and tokenizer in our model, equal to the reference implementation
(`transformers`, a test-only dependency), and `--init-from gpt2` on the command line. Nothing
here touches the network: the snapshots are tiny random GPT-2s written by the tests."""
import json
import shutil
import socket
import sys

import pytest
import torch
import transformers  # the reference; in requirements.txt, so a missing one fails, never skips
from safetensors.torch import load_file, save_file

import llm
from conftest import TINY_TEXT, read_history, run_main

VOCAB = 300  # 256 bytes, 43 merges of our BPE, and <|endoftext|>
FINETUNE_OPTIONS = ["--block-size", "16", "--batch-size", "4", "--max-iters", "20",
                    "--eval-interval", "10", "--eval-iters", "2", "--warmup-iters", "5",
                    "--learning-rate", "1e-3", "--device", "cpu"]
TOKENIZER_STRINGS = [
    "Hello world", "naïve café, 東京 🙂 ½ ² Ⅻ", "don't you'll I'm we've they'd it's QUICK'S",
    "In 2024 there were 1234567 numbers, 3.14 and -7", "a    b   \n\n  c  ", "   ",
    "first<|endoftext|>second", "<|endoftext|>", "tab\tand\r\nnewline", "a \x1c b",
    "x\u00a0\u00a0y", "The quick brown fox jumps over the lazy dog.", ""]


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any attempt to connect fails the test; the Hugging Face hub is offline, its cache empty."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to use the network: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A tiny random GPT-2 saved by transformers, with a GPT-2-format tokenizer from our BPE."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    assert llm.save_gpt2_tokenizer(llm.BPETokenizer.train(TINY_TEXT, VOCAB - 1), folder) == VOCAB
    llm.save_random_gpt2(folder, vocab_size=VOCAB)  # 2 blocks, 4 heads, 64 channels, 32 positions
    return folder


@pytest.fixture(scope="module")
def reference(snapshot):
    return transformers.GPT2LMHeadModel.from_pretrained(snapshot).eval()


@pytest.fixture(scope="module")
def ours(snapshot):
    return llm.read_gpt2(snapshot).model()


def test_logits_equal_the_reference(ours, reference):
    ids = torch.randint(VOCAB, (3, 32), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        expected = reference(ids).logits
        logits, _ = ours(ids)
    assert logits.shape == expected.shape == (3, 32, VOCAB)
    assert (logits - expected).abs().max() < 1e-5


@pytest.mark.parametrize("generate_ids", [llm.generate, llm.generate_fast])
def test_greedy_generation_equals_the_reference(ours, reference, generate_ids):
    prompt = torch.randint(VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    theirs = reference.generate(prompt, max_new_tokens=20, do_sample=False,
                                pad_token_id=0)[0, 8:].tolist()
    mine = list(generate_ids(ours, prompt[0].tolist(), 20, temperature=0))
    assert mine == theirs


def test_the_snapshot_is_read_as_gpt2(snapshot, ours):
    assert ours.cfg.block_size == 32 and ours.cfg.mlp == "gelu_tanh" and ours.cfg.bias
    assert ours.lm_head.weight is ours.embed.token.weight  # still tied
    weights = load_file(snapshot / "model.safetensors")
    c_attn = weights["transformer.h.1.attn.c_attn.weight"]  # (in, out): Conv1D
    assert torch.equal(ours.blocks[1].attn.qkv.weight, c_attn.t())


def test_tokenizer_equals_the_reference(snapshot):
    theirs = transformers.GPT2Tokenizer.from_pretrained(snapshot)
    mine = llm.GPT2Tokenizer.from_files(snapshot)
    assert mine.vocab_size == VOCAB and mine.end_id == VOCAB - 1
    for text in TOKENIZER_STRINGS:
        ids = mine.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert mine.decode(ids) == text


def test_gpt2_byte_table():
    chars = llm.gpt2_byte_chars()
    assert len(set(chars)) == 256
    assert chars[32] == "Ġ" and chars[10] == "Ċ" and chars[ord("A")] == "A"
    assert sum(chars[b] == chr(b) for b in range(256)) == 188


def test_the_gpt2_pattern_knows_letters_and_numbers_of_every_script():
    chunks = llm.gpt2_chunk_pattern().findall("I'll pay 2½ for naïve 東京   tea")
    assert chunks == ["I", "'ll", " pay", " 2½", " for", " naïve", " 東京", "  ", " tea"]


def test_the_tokenizer_survives_a_checkpoint(snapshot):
    tokenizer = llm.GPT2Tokenizer.from_files(snapshot)
    state = llm.tokenizer_state(tokenizer)
    assert state["kind"] == "gpt2"
    restored = llm.tokenizer_from_state(json.loads(json.dumps(state)))  # plain values only
    assert isinstance(restored, llm.GPT2Tokenizer)
    for text in TOKENIZER_STRINGS:
        assert restored.encode(text) == tokenizer.encode(text)


def copy_snapshot(snapshot, tmp_path, change):
    """A copy of the snapshot whose tensors went through `change(dict)`."""
    folder = tmp_path / "changed"
    shutil.copytree(snapshot, folder)
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def sample_error(weights):
    """What `sample --init-from gpt2 --weights DIR` says, run in-process: its one line."""
    result = run_main("sample", "--init-from", "gpt2", "--weights", weights)
    assert (result.returncode, result.stdout) == (2, "")
    return result.stderr


def test_a_missing_tensor_is_one_exact_line(snapshot, tmp_path):
    folder = copy_snapshot(snapshot, tmp_path,
                           lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    assert sample_error(folder) == (
        f"error: {folder / 'model.safetensors'} has no tensor h.1.mlp.c_fc.weight (llm.py's "
        "blocks.1.mlp.fc.weight): the file is incomplete or not GPT-2's; download the snapshot "
        "again\n")


def test_a_tensor_of_the_wrong_shape_is_one_exact_line(snapshot, tmp_path):
    def shrink(tensors):
        tensors["transformer.h.0.attn.c_attn.weight"] = torch.zeros(64, 190)
    folder = copy_snapshot(snapshot, tmp_path, shrink)
    assert sample_error(folder) == (
        f"error: {folder / 'model.safetensors'}: h.0.attn.c_attn.weight has shape (64, 190), but "
        "config.json asks for (64, 192): the two files come from different models; download the "
        "snapshot again\n")


def test_a_tensor_from_another_model_is_one_exact_line(snapshot, tmp_path):
    def extra_block(tensors):
        tensors["transformer.h.2.ln_1.weight"] = torch.ones(64)
    folder = copy_snapshot(snapshot, tmp_path, extra_block)
    assert sample_error(folder) == (
        f"error: {folder / 'model.safetensors'} holds h.2.ln_1.weight, which a GPT-2 of "
        "config.json's shape does not have: the two files come from different models\n")


def test_a_config_that_contradicts_itself_is_named_first(snapshot, tmp_path):
    folder = copy_snapshot(snapshot, tmp_path, lambda tensors: None)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["n_head"] = 5  # 64 channels cannot be cut into 5 equal heads
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert sample_error(folder) == (
        f"error: {folder / 'config.json'} sets n_embd 64, which its n_head 5 does not divide: no "
        "GPT-2 has that shape; download the snapshot again\n")  # not "different models"


def test_a_folder_without_the_files_is_one_exact_line(tmp_path):
    assert sample_error(tmp_path) == (
        f"error: --weights {tmp_path} lacks config.json, model.safetensors, vocab.json, "
        "merges.txt: put config.json, model.safetensors, vocab.json, merges.txt from "
        "https://huggingface.co/openai-community/gpt2 in a folder and pass --weights DIR\n")


def test_weights_without_init_from_is_one_exact_line(tmp_path):
    result = run_main("sample", "--weights", tmp_path)
    assert (result.returncode, result.stderr) == (
        2, "error: --weights and --download go with --init-from gpt2: add it\n")


def test_without_huggingface_hub_one_line_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes its import fail
    with pytest.raises(llm.UserError, match="pip install huggingface_hub.*--weights DIR"):
        llm.find_gpt2_snapshot(download=True)


def test_offline_without_the_weights_one_line_says_how_to_get_them(tmp_path, monkeypatch):
    import huggingface_hub.constants  # (read from the environment when it was imported)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    by_hand = (f"put config.json, model.safetensors, vocab.json, merges.txt from "
               f"https://huggingface.co/openai-community/gpt2 in a folder and pass --weights DIR")
    result = run_main("sample", "--init-from", "gpt2", "--prompt", "Hi")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("error: GPT-2's weights are not on this machine: add --download to "
                             "fetch them (about 500 MB) into the Hugging Face cache, or "
                             f"{by_hand}\n")
    result = run_main("sample", "--init-from", "gpt2", "--prompt", "Hi", "--download")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("error: could not download openai-community/gpt2 from "
                                    "huggingface.co (")
    assert result.stderr.endswith(f"); if you are offline, {by_hand}\n")


def test_sample_init_from_gpt2_writes(snapshot, capsys):
    assert llm.main(["sample", "--init-from", "gpt2", "--weights", str(snapshot),
                     "--prompt", "The quick", "--num-chars", "30"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The quick") and len(out) == len("The quick") + 30 + 1


def test_finetune_starts_from_the_weights(snapshot, tmp_path, tiny_text_file, monkeypatch):
    pretrained = llm.read_gpt2(snapshot)
    real_train, seen = llm.train, {}

    def train_and_look(model, *args):
        seen["qkv"] = model.blocks[0].attn.qkv.weight.detach().clone()
        seen["positions"] = model.embed.position.weight.shape
        return real_train(model, *args)

    monkeypatch.setattr(llm, "train", train_and_look)
    cfg = llm.finetune_config(pretrained, {"block_size": 16, "max_iters": 1, "eval_iters": 1,
                                           "device": "cpu"})
    llm.run_training(cfg, TINY_TEXT, tmp_path, log=lambda *_: None, start=pretrained.start())
    assert torch.equal(seen["qkv"], pretrained.weights["blocks.0.attn.qkv.weight"])
    assert seen["positions"] == (16, 64)  # the first 16 of the 32 learned positions


def test_finetune_options_that_the_weights_decide_are_refused(snapshot):
    pretrained = llm.read_gpt2(snapshot)
    with pytest.raises(llm.UserError, match="drop it"):
        llm.finetune_config(pretrained, {"n_layer": 3})
    with pytest.raises(llm.UserError, match="longer than GPT-2's context of 32"):
        llm.finetune_config(pretrained, {"block_size": 64})
    assert llm.finetune_config(pretrained, {}).block_size == 32  # FINETUNE's 256, capped


def test_finetune_lowers_bits_per_byte_and_sample_reads_gpt2s_tokenizer_back(snapshot, tmp_path,
                                                                            tiny_text_file, capsys):
    assert llm.main(["train", "--init-from", "gpt2", "--weights", str(snapshot), "--data",
                     str(tiny_text_file), *FINETUNE_OPTIONS, "--out-dir", str(tmp_path)]) == 0
    rows = read_history(tmp_path)
    assert float(rows[-1]["val_bpb"]) < float(rows[0]["val_bpb"])  # bits per byte fell
    capsys.readouterr()
    assert llm.main(["sample", "--out-dir", str(tmp_path), "--prompt", "The",
                     "--num-chars", "20"]) == 0  # GPT-2's tokenizer came back from the checkpoint
    assert capsys.readouterr().out.startswith("The")  # (bit-exact resume: test_reliability)


def test_the_gpt2_preset_is_gpt2():
    assert llm.preset("gpt2").mlp == "gelu_tanh" and llm.preset("gpt2").bias
    shape = llm.preset("gpt2", "gpt2")
    assert (shape.n_layer, shape.n_head, shape.n_embd, shape.block_size) == (12, 12, 768, 1024)
    with torch.device("meta"):
        assert llm.GPT(shape, 50257).num_parameters() == 124_439_808
    mlp = llm.MLP(llm.ModelConfig(n_embd=16, mlp="gelu_tanh"))
    x = torch.randn(2, 3, 16)
    expected = mlp.proj(torch.nn.functional.gelu(mlp.fc(x), approximate="tanh"))
    assert torch.allclose(mlp(x), expected)
