"""Hugging Face interop: gptds and transformers' GPT2LMHeadModel give the same logits in both
directions, greedy generation agrees, and the exported tokenizer encodes like gptds."""

import json

import pytest
import torch
import transformers  # noqa: E402  (dev extra: the reference implementation)

from gptds.__main__ import main  # noqa: E402
from gptds.model import GPT, GPTConfig  # noqa: E402
from gptds.tokenizer import decode, encode  # noqa: E402
from gptds.weights import load_hf_directory, load_model, save_hf_directory, state_dict_for_saving  # noqa: E402


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A small randomly initialised GPT-2 saved the way transformers saves it."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm gains so a transpose mistake shows
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.05)
    out = tmp_path_factory.mktemp("hf")
    model.save_pretrained(out)
    return model, out


def test_hf_to_gptds_logits_match(hf_model):
    model, path = hf_model
    ours = load_model(path).eval()
    x = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], model(x).logits, rtol=0, atol=1e-5)


def random_gptds_model(config):
    """A gptds model with non-zero biases and LayerNorm parameters, so a transpose mistake shows."""
    torch.manual_seed(1)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.05)
    return model.eval()


def test_gptds_to_hf_logits_match(tmp_path):
    ours = random_gptds_model(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=32))
    save_hf_directory(ours.config, state_dict_for_saving(ours).items(), tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], rtol=0, atol=1e-5)


def test_padded_vocab_exports_only_real_rows(tmp_path):
    ours = random_gptds_model(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, pad_vocab_to_multiple_of=64))
    save_hf_directory(ours.config, state_dict_for_saving(ours).items(), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 50257
    config, sd = load_hf_directory(tmp_path)
    assert sd["transformer.wte.weight"].shape == (50257, 16)


def test_greedy_generate_cli_matches_transformers(hf_model, capsys):
    model, path = hf_model
    prompt = "The quick brown fox"
    ids = torch.tensor([encode(prompt)])
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=50256)[0, ids.size(1):]
    assert main(["generate", "--checkpoint", str(path), "--prompt", prompt, "--max_new_tokens", "12",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == prompt + decode(expected.tolist())


def test_exported_tokenizer_encodes_like_gptds(tmp_path):
    ours = random_gptds_model(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_hf_directory(ours.config, state_dict_for_saving(ours).items(), tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["Hello world, this is GPT-2.", "ROMEO:\n  But, soft!\n\n\tWhat light?  ",
                 "caf\u00e9 \u4e2d\u6587 \U0001f600",
                 "It's 2024; they'll've won 3.14%"]:
        assert tok.encode(text) == encode(text)
    assert tok.eos_token_id == 50256
