"""The GPT engine: parameter counts, state-dict keys, config validation, initialisation, activation
checkpointing and the KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from gptds.model import GPT, PRESETS, GPTConfig, attention_backend


def test_gpt2_has_exactly_124439808_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_parameters() == 124_439_808
    assert model.num_parameters(exclude_position_embedding=True) == 124_439_808 - 1024 * 768


@pytest.mark.parametrize("name,expected", [("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
                                           ("gpt2-xl", 1_557_611_200)])
def test_larger_presets_match_openai_sizes(name, expected):
    with torch.device("meta"):
        assert GPT(GPTConfig.from_preset(name)).num_parameters() == expected


def test_vocab_padding_stores_50304_rows_but_returns_50257_logits():
    config = GPTConfig.from_preset("tiny", pad_vocab_to_multiple_of=64)
    assert config.padded_vocab_size == 50304
    model = GPT(config)
    assert model.transformer.wte.weight.shape == (50304, 64)
    logits, _ = model(torch.zeros(1, 3, dtype=torch.long))
    assert logits.shape == (1, 3, 50257)


def test_state_dict_keys_are_gpt2_names():
    keys = list(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=11)).state_dict())
    assert keys == [
        "transformer.wte.weight", "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias",
        "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
        "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias",
        "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]


def test_embeddings_are_tied():
    model = GPT(GPTConfig.from_preset("tiny"))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=1000)
    model = GPT(config)
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0)


@pytest.mark.parametrize("overrides,field", [
    (dict(n_embd=100, n_head=3), "n_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_embd=-8), "n_embd"),
    (dict(block_size=0), "block_size"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig.from_preset("tiny", **overrides)


def test_unknown_preset_lists_the_allowed_names():
    with pytest.raises(ValueError) as e:
        GPTConfig.from_preset("gpt5")
    for name in PRESETS:
        assert name in str(e.value)


def test_loss_ignores_minus_100_targets():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    x = torch.randint(0, 50257, (2, 8))
    y = x.clone()
    y[:, :5] = -100
    logits, loss = model(x, y)
    manual = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 50257), y[:, 5:].reshape(-1))
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    x = torch.randint(0, 50257, (2, 16))
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.activation_checkpointing = on
        model(x, x)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_recomputes_blocks_in_backward():
    model = GPT(GPTConfig.from_preset("tiny"))
    calls = []
    model.transformer.h[0].mlp.c_fc.register_forward_pre_hook(lambda *a: calls.append(1))
    x = torch.randint(0, 50257, (1, 8))
    for on, expected in ((False, 1), (True, 2)):
        calls.clear()
        model.activation_checkpointing = on
        model(x, x)[1].backward()
        assert len(calls) == expected


def test_kv_cache_generation_equals_recomputing_the_whole_sequence():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    prompt = torch.randint(0, 50257, (2, 5))
    cached = model.generate(prompt, 20, temperature=0)
    ids = prompt
    for _ in range(20):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_generation_past_block_size_reencodes_the_last_half_window():
    """Past block_size the cache is refilled from the last block_size // 2 tokens (learned absolute positions
    rule out a rolling cache): each token is predicted from the tokens since the last refill, and the work per
    token stays bounded (forward positions counted) however long the generation."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50)
    model = GPT(config).eval()
    positions = []
    model.register_forward_pre_hook(lambda module, args, kwargs: positions.append(args[0].size(1)), with_kwargs=True)
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 40, temperature=0)
    assert out.shape == (1, 43)
    assert sum(positions) <= 3 + 2 * 40  # the prompt, one position per token, a half window per half window
    ids, start = torch.zeros(1, 3, dtype=torch.long), 0  # reference: the window the cache holds
    for _ in range(40):
        logits, _ = model(ids[:, start:])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        if ids.size(1) - start > 8:
            start = ids.size(1) - 4
    assert torch.equal(out, ids)


def test_sampling_is_seeded_and_stops_at_the_stop_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    a = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    first = a[0, 2].item()
    stopped = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1),
                             stop_token=first)
    assert stopped.shape == (1, 3)


def test_attention_backend_is_sdpa_on_cpu():
    assert attention_backend(torch.device("cpu"), torch.bfloat16) == "sdpa"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loss_over_padded_logits_equals_torchs_cross_entropy_on_the_real_columns(dtype):
    """The loss and its gradient equal F.cross_entropy (in fp32) over the vocab_size real columns; the
    padding columns get no gradient; ignored targets (-100) count for nothing."""
    from gptds.model import cross_entropy
    torch.manual_seed(0)
    V, padded = 50257, 50304
    logits = (torch.randn(2, 40, padded) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (2, 40))
    targets[0, :7] = -100
    loss = cross_entropy(logits, targets, V)
    loss.backward()
    reference_logits = logits.detach().float()[..., :V].requires_grad_()
    reference = F.cross_entropy(reference_logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    reference.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=1e-6)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded to bf16
    assert torch.allclose(logits.grad[..., :V].float(), reference_logits.grad, atol=tolerance * 1e-3,
                          rtol=tolerance)
    assert not logits.grad[..., V:].any()


def test_bf16_loss_keeps_no_full_size_fp32_copy_of_the_logits():
    """What autograd saves for the bf16 loss: the bf16 logits and per-row fp32 values, never a tensor of
    the logits' size in fp32 (F.cross_entropy(logits.float()) saves one, twice the bf16 logits)."""
    from gptds.model import cross_entropy
    logits = torch.randn(4, 64, 1024, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy(logits, torch.randint(0, 1000, (4, 64)), 1000)
    big_fp32 = [t for t in saved if t.dtype == torch.float32 and t.numel() >= logits.numel() // 2]
    assert not big_fp32, [tuple(t.shape) for t in big_fp32]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.cross_entropy(logits.float().reshape(-1, 1024), torch.randint(0, 1000, (256,)))
    assert any(t.dtype == torch.float32 and t.numel() == logits.numel() for t in saved)  # the spy sees it
