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


def test_special_token_strings_in_text_gptds_as_text_the_export_as_the_token(tmp_path):
    """The contract (README, model card): gptds encodes a special-token string typed in text as ordinary
    characters, so text cannot forge an end of text (or a chat turn); the exported tokenizer keeps
    transformers' default, where a registered special-token string in the text becomes the token."""
    ours = random_gptds_model(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_hf_directory(ours.config, state_dict_for_saving(ours).items(), tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Question<|endoftext|>Answer"
    assert encode(text) == [24361, 27, 91, 437, 1659, 5239, 91, 29, 33706]  # "<", "|", "end", "of", "text", "|", ">"
    assert tok.encode(text) == [24361, 50256, 33706]
    assert decode(encode(text)) == text == tok.decode(tok.encode(text))
    plain = "Question: what? Answer: this."  # without special-token strings, the same ids
    assert tok.encode(plain) == encode(plain)


def test_exported_tokenizer_truncates_to_the_models_context(tmp_path):
    ours = random_gptds_model(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_hf_directory(ours.config, state_dict_for_saving(ours).items(), tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 16
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("word " * 100, truncation=True, return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 16)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert theirs(ids).logits.shape == (1, 16, 50257)  # fits the 16 positions


def test_model_card_names_no_local_path_and_states_the_tokenizer_contract(tmp_path):
    from gptds.convert import model_card
    meta = {"job": "pretrain", "step": 6, "precision": "fp32", "zero_stage": 2, "world_size": 2, "optimizer": "adamw",
            "val_loss": 5.5, "data_dir": str(tmp_path / "data" / "corpus"),
            "data_source": {"inputs": [str(tmp_path / "texts")], "files": [str(tmp_path / "texts" / "a.txt"),
                                                                          str(tmp_path / "texts" / "b.txt")]},
            "model_config": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 128}}
    card = model_card(meta, tmp_path / "run" / "checkpoints" / "step_00000006")
    assert str(tmp_path) not in card and "/tmp" not in card, card
    assert "a.txt, b.txt (2 files)" in card and "checkpoint step_00000006" in card and "context 128 tokens" in card
    assert "gptds encodes special-token strings typed in text" in card and "`model_max_length` is the model's " \
        "context, 128 tokens" in card
    hub = model_card({**meta, "data_source": {"dataset": "HuggingFaceFW/fineweb-edu", "dataset_config":
                                              "sample-10BT", "dataset_split": "train"}}, tmp_path / "step_00000006")
    assert "training data: HuggingFaceFW/fineweb-edu sample-10BT train" in hub


@pytest.mark.parametrize("penalty,min_new", [(1.3, 0), (1.0, 5), (2.0, 3)])
def test_repetition_penalty_and_min_new_tokens_match_transformers(hf_model, penalty, min_new):
    model, path = hf_model
    ours = load_model(path).eval()
    ids = torch.tensor([encode("The quick brown fox jumps over the lazy dog")])
    # with min_new_tokens, the stop token is the first one greedy decoding picks, so that it decides the output
    stop = model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=50256)[0, -1].item() if min_new \
        else 50256
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=penalty,
                              min_new_tokens=min_new, eos_token_id=stop, pad_token_id=stop)[0]
    with torch.no_grad():
        got = ours.generate(ids, 12, temperature=0, stop_token=stop, repetition_penalty=penalty,
                            min_new_tokens=min_new)[0]
    assert len(expected) > ids.size(1) + max(min_new, 1)
    assert got[:len(expected)].tolist() == expected.tolist()  # transformers ends at the stop; gptds pads with it
    if penalty != 1.0:  # the penalty changed something
        plain = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=50256)[0]
        assert plain.tolist() != expected.tolist()
