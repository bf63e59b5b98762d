"""Chat: conversations rendered in ChatML with an exact loss mask (token by token, across turns and records),
the layouts people have, bad conversations refused, the Hugging Face chat template giving gptds's ids,
data mixtures drawn in proportion and resumed exactly, the embedding grown for the ChatML tokens, and
`gptds chat` scripted and in a real terminal."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT

from gptds.data.chat import Message, conversation_from_fields, encode_conversation, prompt_tokens, render
from gptds.data.instruct import IGNORE_INDEX
from gptds.data.loaders import MixtureLoader, build_loader, parse_data_dirs
from gptds.data.prepare import PrepareChatConfig, prepare_chat
from gptds.errors import UserError
from gptds.model import GPT, GPTConfig
from gptds.tokenizer import CHAT_VOCAB_SIZE, IM_END_ID, IM_START_ID, decode, encode
from gptds.weights import load_model, save_hf_directory, state_dict_for_saving

CONVERSATION = [Message("system", "Be brief."), Message("user", "Hi!"), Message("assistant", "Hello."),
                Message("user", "Name a colour."), Message("assistant", " Blue, or\nred.")]


def test_multi_turn_mask_is_exact_token_by_token():
    tokens, is_target, turn_ends = render(CONVERSATION)
    expected_tokens, expected_targets, expected_ends = [], [], []
    for m in CONVERSATION:
        head, body = encode(f"{m.role}\n"), encode(f"{m.role}\n{m.content}")[len(encode(f"{m.role}\n")):]
        assert encode(f"{m.role}\n{m.content}") == head + body  # these contents start a new piece
        learn = m.role == "assistant"
        expected_tokens += [IM_START_ID, *head, *body, IM_END_ID, *encode("\n")]
        expected_targets += [False] * (1 + len(head)) + [learn] * (len(body) + 1) + [False]
        expected_ends += [len(expected_tokens)] if learn else []
    assert tokens.tolist() == expected_tokens and is_target.tolist() == expected_targets
    assert turn_ends == expected_ends
    # a token holding both the template's "\n" and content counts as content: GPT-2's pre-tokeniser makes
    # "assistant\n\n\nx" into "ass", "istant", "\n\n" (one token: the template's newline and the content's
    # first), "\n", "x"
    tokens, is_target, _ = render([Message("user", "q"), Message("assistant", "\n\nx")])
    start = len(render([Message("user", "q")])[0]) + 1  # after <|im_start|>
    pieces = [decode([t]) for t in tokens[start:start + 5].tolist()]
    assert pieces == ["ass", "istant", "\n\n", "\n", "x"]
    assert is_target[start:start + 6].tolist() == [False, False, True, True, True, True]  # and <|im_end|>


def test_packed_rows_take_the_loss_on_assistant_tokens_only(chat_data):
    """Rows from the loader: every target is an assistant token or <|im_end|>, and every assistant token of
    a record inside the row is a target (the mask survives packing across record and turn boundaries)."""
    loader = build_loader(chat_data, "train", 4, 128, 0, 1, seed=0)
    x, y = loader.next_batch()
    assert (y != IGNORE_INDEX).any()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        inside_assistant = False
        for i, (token, target) in enumerate(zip(row_x, row_y)):
            if token == IM_START_ID:
                nxt = row_x[i + 1] if i + 1 < len(row_x) else None
                inside_assistant = nxt == encode("assistant")[0]
            if target != IGNORE_INDEX:
                assert inside_assistant, (i, token, target)
            if target == IM_END_ID:
                inside_assistant = False


def test_layouts_render_the_same_conversation():
    openai = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]}
    dolly = {"instruction": "What is 2+2?", "context": "", "response": "4", "category": "open_qa"}
    rendered = [render(conversation_from_fields(fields, layout, "x"))[0].tolist()
                for fields, layout in ((openai, "openai"), (sharegpt, "sharegpt"), (dolly, "dolly"))]
    assert rendered[0] == rendered[1] == rendered[2]


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "turn 1 (assistant) is empty"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "turns 1 and 2 are both assistant turns"),
    ({"conversations": [{"from": "alien", "value": "a"}]}, "unknown role 'alien'"),
    ({"messages": "hello"}, "must be a non-empty list"),
])
def test_bad_conversations_are_refused_with_file_and_line(tmp_path, record, message):
    good = [json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                     {"role": "assistant", "content": f"hello {i}"}]}) for i in range(12)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join([good[0], json.dumps(record), *good[1:]]) + "\n")
    with pytest.raises(UserError, match=rf"{path}:2: .*{re.escape(message)}"):
        prepare_chat(PrepareChatConfig(input=[str(path)], output_dir=str(tmp_path / "out"), num_workers=0,
                                       val_fraction=0.4))
    assert not (tmp_path / "out").exists()
    skipped = prepare_chat(PrepareChatConfig(input=[str(path)], output_dir=str(tmp_path / "out"), num_workers=0,
                                             val_fraction=0.4, skip_bad=True))
    assert json.loads((skipped / "manifest.json").read_text())["skipped_bad"] == 1


def test_long_conversations_are_cut_after_the_last_turn_that_fits():
    long = [Message("user", "a " * 30), Message("assistant", "b " * 30), Message("user", "c " * 30),
            Message("assistant", "d " * 30)]
    whole, is_target, ends = render(long)
    cut = encode_conversation(long, context_length=ends[0] + 5)
    assert cut.status == "cut" and len(cut.tokens) == ends[0] and cut.tokens.tolist() == whole[:ends[0]].tolist()
    short = encode_conversation(long, context_length=ends[0] - 10)
    assert short.status == "truncated" and short.mask.sum() > 0
    assert encode_conversation(long, context_length=10).status == "dropped"


def _chat_model(tmp_path, vocab_size=CHAT_VOCAB_SIZE):
    torch.manual_seed(0)
    config = GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32, vocab_size=vocab_size,
                       pad_vocab_to_multiple_of=64)
    model = GPT(config)
    save_hf_directory(config, state_dict_for_saving(model).items(), tmp_path / "hf")
    return model


def test_the_hugging_face_chat_template_gives_gptds_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    _chat_model(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    conversations = [
        [Message("user", "Hello there")],
        CONVERSATION[:-1],
        [Message("system", "  spaces\n\nand lines "), Message("user", "ünïcödé 日本語 😀\t\ttabs"),
         Message("assistant", "\n\n\nok"), Message("user", "?")],
    ]
    for conversation in conversations:
        messages = [{"role": m.role, "content": m.content} for m in conversation]
        theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(theirs) == prompt_tokens(conversation)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert IM_END_ID in generation["eos_token_id"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == CHAT_VOCAB_SIZE


def test_a_gpt2_vocabulary_model_grows_rows_for_the_chatml_tokens(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=16, pad_vocab_to_multiple_of=1)
    base = GPT(config)
    save_hf_directory(config, state_dict_for_saving(base).items(), tmp_path / "hf")
    grown = load_model(tmp_path / "hf", 64, CHAT_VOCAB_SIZE)
    wte, old = grown.transformer.wte.weight, base.transformer.wte.weight
    assert grown.config.vocab_size == CHAT_VOCAB_SIZE and wte.shape[0] == 50304
    assert torch.equal(wte[:50257], old) and torch.allclose(wte[50257], old.mean(dim=0)) and not wte[50259:].any()


def test_mixture_draws_in_proportion_and_resumes_exactly(text_data, dolly_data, chat_data):
    specs = parse_data_dirs([f"{chat_data}:0.6", f"{dolly_data}:0.3", f"{text_data}:0.1"])
    loader = MixtureLoader(specs, "train", 4, 64, rank=0, world_size=2, seed=3)
    counts = np.zeros(3)
    for step in range(400):
        counts += np.bincount(loader.components_of_step(step), minlength=3)
    share = counts / counts.sum()  # 3,200 draws: a standard error of at most 0.009
    assert np.allclose(share, [0.6, 0.3, 0.1], atol=0.03), share
    uninterrupted = [loader.next_batch() for _ in range(6)]
    loader.reset()
    first = [loader.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    resumed = MixtureLoader(specs, "train", 4, 64, rank=0, world_size=2, seed=3)
    resumed.load_state_dict(state)
    rest = [resumed.next_batch() for _ in range(3)]
    for (x, y), (a, b) in zip(uninterrupted, first + rest):
        assert torch.equal(x, a) and torch.equal(y, b)
    with pytest.raises(UserError, match="the weights were"):
        MixtureLoader(parse_data_dirs([f"{chat_data}:0.5", f"{dolly_data}:0.4", f"{text_data}:0.1"]), "train", 4, 64,
                      0, 2, 3).load_state_dict(state)
    with pytest.raises(UserError, match="DIR:WEIGHT with a positive WEIGHT"):
        parse_data_dirs([f"{chat_data}:-1"])


# ---------------------------------------------------------------- gptds chat

@pytest.fixture(scope="module")
def chat_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_model")
    _chat_model(folder)
    return folder / "hf"


def test_scripted_chat_prints_the_reply_alone(chat_weights):
    from gptds.chat import ChatConfig, Conversation, load_chat_model
    proc = subprocess.run([sys.executable, "-m", "gptds", "chat", "--checkpoint", str(chat_weights), "--message",
                           "Hello", "--temperature", "0", "--max_new_tokens", "12"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    model, device = load_chat_model(str(chat_weights))
    expected = Conversation(model, ChatConfig(checkpoint="x", temperature=0, max_new_tokens=12), device).reply("Hello")
    assert proc.stdout == expected + "\n"


def test_the_kv_cache_kept_across_turns_gives_what_a_fresh_encoding_gives(chat_weights):
    from gptds.chat import ChatConfig, Conversation, load_chat_model
    model, device = load_chat_model(str(chat_weights))
    cfg = ChatConfig(checkpoint="x", temperature=0, max_new_tokens=6, system="Be kind.")
    kept = Conversation(model, cfg, device)
    replies = [kept.reply(text) for text in ("Hi", "And then?", "Thanks")]
    for turn in range(3):  # each turn again from an empty cache, given the same history
        fresh = Conversation(model, cfg, device)
        fresh.messages = list(kept.messages[:1 + 2 * turn])
        assert fresh.reply(["Hi", "And then?", "Thanks"][turn]) == replies[turn]


def test_interactive_chat_in_a_real_terminal(chat_weights):
    """Through a pseudo-terminal, as a user types: a reply streams, /system and /reset answer, /quit ends."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "gptds", "chat", "--checkpoint", str(chat_weights),
                                  "--max_new_tokens", "8", "--temperature", "0"])
    output = b""

    def append(data: bytes) -> None:
        nonlocal output
        output += data
    def prompts_after(n: int) -> None:  # wait for the n-th "you> " prompt
        deadline = time.monotonic() + 60
        while output.count(b"you> ") < n and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                append(os.read(fd, 4096))
        assert output.count(b"you> ") >= n, output.decode(errors="replace")

    prompts_after(1)
    os.write(fd, b"Hello\n")
    prompts_after(2)
    assert b"assistant> " in output
    os.write(fd, b"/system Speak like a pirate.\n")
    prompts_after(3)
    assert b"(system turn set; new conversation)" in output
    os.write(fd, b"/reset\n")
    prompts_after(4)
    assert b"\n(new conversation)" in output.replace(b"\r", b"")
    os.write(fd, b"/quit\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


def test_chat_refuses_a_model_that_is_not_a_chat_model(tmp_path, capsys):
    from gptds.__main__ import main
    _chat_model(tmp_path, vocab_size=50257)
    assert main(["chat", "--checkpoint", str(tmp_path / "hf"), "--message", "hi"]) == 2
    assert "not a chat model" in capsys.readouterr().err
