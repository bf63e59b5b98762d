"""GPT-2 in plain PyTorch: the config and its presets, the transformer block, the model, its loss (a
cross-entropy that never makes a full-size fp32 copy of bf16 logits), sampling with a KV cache, and
compiling the blocks' training path. Parameter names are Hugging Face GPT2LMHeadModel's, so weights map
1:1 (its Conv1D weights are the transpose of our nn.Linear weights). Nothing here knows DeepSpeed."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # optional CUDA kernel (the `cuda` extra); SDPA is used wherever it is missing
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

# Architecture presets. The gpt2* sizes are OpenAI's; the small ones are for tests, the CPU demo
# and CPU benchmarks.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),           # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),   # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),    # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),       # 1558M
    "gpt2-micro": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # gpt2 shape, CPU-sized
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),        # the CPU demo
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),         # unit tests
}


@dataclass
class GPTConfig:
    block_size: int = 1024        # longest sequence the position embedding covers, in tokens
    vocab_size: int = 50257       # real vocabulary; logits, sampling and exports always have this many columns
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True             # GPT-2 has biases in Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5
    pad_vocab_to_multiple_of: int = 1  # 64 stores 50304 embedding rows (faster matmuls); padding is storage only

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "pad_vocab_to_multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
                raise ValueError(f"GPTConfig.{name} must be a positive integer below 2**31, got {value!r}")
        if self.n_embd % self.n_head != 0:
            heads = [h for h in range(1, min(self.n_embd, 4096) + 1) if self.n_embd % h == 0]
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head "
                             f"({self.n_head}); allowed n_head values: {heads}")
        for name, low_open in (("dropout", False), ("layer_norm_epsilon", True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    (0.0 < value if low_open else 0.0 <= value) and value < 1.0):
                raise ValueError(f"GPTConfig.{name} must be a number in {'(' if low_open else '['}0, 1), "
                                 f"got {value!r}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple_of
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel CausalSelfAttention uses for training-shaped inputs on this device and dtype."""
    if flash_attn_func is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return "flash-attn"
    return "sdpa"


class KVCache:
    """Keys and values of every layer for positions [0, pos), preallocated to `length` (block_size)."""

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype, length: int | None = None):
        length = config.block_size if length is None else length
        shape = (config.n_layer, batch_size, config.n_head, length, config.n_embd // config.n_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, T, hd) at [pos, pos+T); return all cached keys and values so far."""
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True  # scaled init, see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attn_mask (B, T, S) bool, True where query t may attend key s (S: cached + new keys); omitted:
        causal."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is None and attn_mask is None and attention_backend(x.device, x.dtype) == "flash-attn":
            hd = C // self.n_head  # flash-attn takes (B, T, nh, hd)
            y = flash_attn_func(q.view(B, T, self.n_head, hd), k.view(B, T, self.n_head, hd),
                                v.view(B, T, self.n_head, hd), dropout_p=dropout_p, causal=True)
            return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        mask, causal = None, T > 1
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer, k, v)  # all keys and values so far: (B, nh, start + T, hd)
            if start > 0 and T > 1:  # new tokens after cached ones (a chat's next turn): new token i sees
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)  # 0..start+i
                causal = False
        if attn_mask is not None:  # the caller's (B, T, keys): packed rows, left-padded batches
            mask, causal = attn_mask[:, None], False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                           is_causal=causal)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the first vocab_size columns of logits (..., V_padded) at targets (...),
    skipping targets of -100 (as F.cross_entropy's ignore_index; nan when every target is skipped).
    With weights (...), each position's loss is multiplied by its weight before the sum, which is still
    divided by the number of targets (a policy gradient: weights are the advantages, rl.py).
    fp32 logits go to F.cross_entropy. Lower-precision logits are computed in fp32 a chunk of rows at a
    time and only (rows,) fp32 values are kept for backward, never a full-size fp32 copy of the logits,
    which for gpt2 at B=16, T=1024 would be 3.3 GB (plus as much again for its gradient)."""
    logits_2d, targets_1d = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if logits.dtype == torch.float32 and weights is None:
        return F.cross_entropy(logits_2d[:, :vocab_size], targets_1d, ignore_index=-100)
    if logits.dtype == torch.float32:
        per_token = F.cross_entropy(logits_2d[:, :vocab_size], targets_1d, ignore_index=-100, reduction="none")
        return (per_token * weights.reshape(-1)).sum() / (targets_1d != -100).sum()
    return _ChunkedCrossEntropy.apply(logits_2d, targets_1d, vocab_size,
                                      None if weights is None else weights.reshape(-1).float())


@torch.no_grad()
def token_losses(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The loss at each position (..., ) in fp32, 0 where the target is -100; computed a chunk of rows at a
    time like cross_entropy, without keeping anything for backward (for per-component logging)."""
    logits_2d, targets_1d = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    keep = targets_1d != -100
    out = torch.zeros(logits_2d.size(0), dtype=torch.float32, device=logits.device)
    for start in range(0, logits_2d.size(0), _ChunkedCrossEntropy.CHUNK_ROWS):
        rows = slice(start, start + _ChunkedCrossEntropy.CHUNK_ROWS)
        chunk = logits_2d[rows, :vocab_size].float()
        picked = chunk.gather(1, torch.where(keep[rows], targets_1d[rows], 0)[:, None]).squeeze(1)
        out[rows] = (torch.logsumexp(chunk, dim=-1) - picked) * keep[rows]
    return out.view(targets.shape)


class _ChunkedCrossEntropy(torch.autograd.Function):
    CHUNK_ROWS = 2048  # rows upcast at a time: 2048 x 50304 x 4 bytes = 412 MB of fp32 at most

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        keep = targets != -100
        safe_targets = torch.where(keep, targets, 0)
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)  # (N,)
        for start in range(0, logits.size(0), _ChunkedCrossEntropy.CHUNK_ROWS):
            rows = slice(start, start + _ChunkedCrossEntropy.CHUNK_ROWS)
            lse[rows] = torch.logsumexp(logits[rows, :vocab_size].float(), dim=-1)
        target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
        count = keep.sum()
        scale = keep.float() if weights is None else weights * keep  # (N,): each row's weight in the sum
        ctx.save_for_backward(logits, safe_targets, scale, lse, count)
        ctx.vocab_size = vocab_size
        return ((lse - target_logits) * scale).sum() / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, weight, lse, count = ctx.saved_tensors
        V = ctx.vocab_size
        grad = torch.zeros_like(logits)  # padding columns get no gradient
        scale = (grad_out / count) * weight  # (N,): d loss / d row
        for start in range(0, logits.size(0), _ChunkedCrossEntropy.CHUNK_ROWS):
            rows = slice(start, start + _ChunkedCrossEntropy.CHUNK_ROWS)
            probs = torch.exp(logits[rows, :V].float() - lse[rows, None])  # softmax, fp32, one chunk
            probs[torch.arange(probs.size(0), device=probs.device), targets[rows]] -= 1.0
            grad[rows, :V] = (probs * scale[rows, None]).to(grad.dtype)
        return grad, None, None, None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # Recompute each block in backward instead of storing its activations; set per run.
        self.activation_checkpointing = False
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input/output embedding
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        # GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer) (two per block).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_position_embedding: bool = False) -> int:
        """Parameter count, the tied embedding counted once."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if exclude_position_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, loss_weights: torch.Tensor | None = None,
                temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab_size) and, given targets (B, T) with -100
        where no loss is taken, the mean cross-entropy over the other positions.

        For packed or padded rows (evaluation, batched generation): positions (B, T) are each token's
        position (default: consecutive from the cache's), attn_mask (B, T, S) bool who attends to whom
        (default: causal), and logits_at (B, T) bool (or flat indices into B * T) the positions whose
        logits are wanted: the logits are then (N, vocab_size), N = logits_at.sum(), in row-major order,
        and the output layer runs on those rows only (for a small model most of the compute is that
        layer's); targets are then (N,) (training on responses only: loaders.DeviceBatches, rl.py).
        loss_weights (shaped as targets) weight each position's loss (cross_entropy); with temperature, the
        logits are divided by it first (RL trains the distribution it sampled from)."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if positions is None:
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
            positions = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)
        if logits_at is not None and logits_at.dtype == torch.bool:
            x = x[logits_at]  # (N, C)
        elif logits_at is not None:  # flat indices into (B * T): no device sync to learn N
            if logits_at.dtype != torch.long or logits_at.dim() != 1:
                raise ValueError(f"logits_at: a (B, T) bool mask or 1-D int64 flat indices, got {logits_at.dtype} "
                                 f"of shape {tuple(logits_at.shape)}")
            x = x.reshape(-1, x.size(-1)).index_select(0, logits_at)
        padded_logits = self.lm_head(x)  # (B, T, padded V): the padding columns are never read
        if temperature is not None and temperature != 1.0:
            padded_logits = padded_logits / temperature
        loss = None if targets is None else cross_entropy(padded_logits, targets, self.config.vocab_size, loss_weights)
        return padded_logits[..., :self.config.vocab_size], loss  # (B, T, V)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 stop_token: int | tuple[int, ...] | None = None, repetition_penalty: float = 1.0,
                 min_new_tokens: int = 0, on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Continue idx (B, T) by up to max_new_tokens, sampling at `temperature` (0 = greedy) from the
        top_k most likely tokens; on_token(next_token (B, 1)) is called as each is drawn (streaming). Rows
        that emit a stop_token (one id, or a tuple of them) are padded with it; generation ends when every
        row has. As in transformers: repetition_penalty > 1 makes every token already in the row (prompt or
        continuation) less likely (positive logits divided by it, negative ones multiplied); a stop_token
        cannot come before min_new_tokens tokens.
        Each new token costs one cached step. Past block_size: GPT-2's positions are learned and absolute,
        so the cache cannot roll; when it is full, the last block_size // 2 tokens are encoded again from
        position 0 and generation goes on from there. So every token is predicted from at least the last
        block_size // 2 tokens and at most block_size, and the cost per token stays bounded (one re-encoding
        of block_size // 2 tokens per block_size // 2 new ones), however many are asked for."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        block = self.config.block_size
        param = next(self.parameters())
        cache = KVCache(self.config, idx.size(0), idx.device, param.dtype)
        logits, _ = self(idx[:, -block:], kv_cache=cache)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        seen = torch.zeros(idx.size(0), logits.size(-1), dtype=torch.bool, device=idx.device)  # (B, V)
        stops = torch.tensor([] if stop_token is None else stop_token, dtype=torch.long, device=idx.device).reshape(-1)
        seen.scatter_(1, idx, True)
        for step in range(max_new_tokens):
            next_logits = logits[:, -1, :].float()  # (B, V)
            if repetition_penalty != 1.0:
                penalised = torch.where(next_logits > 0, next_logits / repetition_penalty,
                                        next_logits * repetition_penalty)
                next_logits = torch.where(seen, penalised, next_logits)
            if stop_token is not None and step < min_new_tokens:
                next_logits[:, stops] = float("-inf")
            next_token = next_token_of(next_logits, temperature, top_k, generator)  # (B, 1)
            if stop_token is not None:
                next_token = torch.where(done[:, None], idx[:, -1:], next_token)  # a finished row repeats its stop
                done |= torch.isin(next_token[:, 0], stops)
            seen.scatter_(1, next_token, True)
            idx = torch.cat([idx, next_token], dim=1)
            if on_token is not None:
                on_token(next_token)
            if stop_token is not None and bool(done.all()):
                break
            if cache.pos < block:
                logits, _ = self(next_token, kv_cache=cache)
            else:  # cache full: encode the last half-window again, from position 0
                cache.pos = 0
                logits, _ = self(idx[:, -(block // 2):], kv_cache=cache)
        return idx


def next_token_of(logits: torch.Tensor, temperature: float, top_k: int | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The next token (B, 1) from last-position logits (B, V): the argmax at temperature 0, else a draw
    from softmax(logits / temperature) over the top_k most likely tokens (all when top_k is None).
    The draw inverts the cumulative distribution at one uniform number per row: B random numbers, where
    torch.multinomial draws one per vocabulary entry on the CPU (37 ms for 32 rows of GPT-2's vocabulary,
    against about 2 ms for this)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    ids = None
    if top_k is not None and top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k)  # (B, k), ties at the k-th included as torch.topk picks them
    cdf = F.softmax(logits, dim=-1).double().cumsum(dim=-1)  # fp64: no drift over 50k terms
    u = torch.rand((logits.size(0), 1), generator=generator, device=logits.device, dtype=cdf.dtype)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=logits.size(-1) - 1)  # (B, 1)
    return picked if ids is None else ids.gather(1, picked)


def compile_blocks(model: GPT) -> None:
    """torch.compile each transformer block's training path (torchtitan's way: the blocks are identical,
    so one graph serves them all, and activation checkpointing wraps the compiled block). Calls with a
    KV cache (sampling: a new position every call) or an attention mask (packed evaluation rows) run the
    eager block, so sampling and evaluation never recompile; validation shapes compile once more. The blocks keep their
    parameter names (nn.Module.compile), so checkpoints are the same with and without it."""
    for block in model.transformer.h:
        eager = block.forward
        compiled = torch.compile(eager)

        def forward(x, kv_cache=None, attn_mask=None, eager=eager, compiled=compiled):
            return eager(x, kv_cache, attn_mask) if kv_cache is not None or attn_mask is not None else compiled(x)
        block.forward = forward
