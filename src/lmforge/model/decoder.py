"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM.

Read top to bottom: helpers (RMSNorm, RoPE, masks, KV cache) → attention → MLP → block → model → LM head.
Module names follow Hugging Face (`model.layers.0.self_attn.q_proj`, ...), so loading a HF checkpoint is an
identity key map. The family differences are composed when the modules are built (biases, q/k norm, sliding
window layers, tied embeddings); `forward` has no per-family branches.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.configs import DecoderConfig
from lmforge.model.init import empty_embedding, init_weights, tie_weights
from lmforge.model.linear import Linear

IGNORE_INDEX = -100
"""Target id that contributes no loss (prompt tokens, padding)."""

# ---------------------------------------------------------------------------------------------- helpers


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as HF does, so bf16 results agree)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: DecoderConfig, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies of the rotary embedding, (head_dim // 2,) fp32, with Llama-3 scaling if set."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin for each position, (B, T, head_dim), in HF's half-split layout."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim // 2), fp32
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, n_head, T, head_dim) by the position angles: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def build_mask(
    attention_mask: Tensor | None,
    past: int,
    T: int,
    window: int | None,
    device: torch.device,
    segment_ids: Tensor | None = None,
    *,
    index: Tensor | None = None,
    keys: int = 0,
) -> Tensor | None:
    """Boolean (B|1, 1, T, S) mask of the keys each query may see, or None for plain causal attention.

    Query i sits at cache index past + i (S = past + T) and sees key j when j <= past + i, j is not padding, on
    sliding layers j > past + i - window, and with `segment_ids` (B, T) of a packed row (no cache) j is in i's
    sample. A query always sees itself, so padding rows never become all -inf (NaN). Given `index` (T,), a
    static cache's step, query i sits at column index[i] instead and the keys are the cache's first `keys`
    columns (the attention mask's width): columns not yet written are padding there, so none of them is seen.
    """
    static = index is not None
    plain = attention_mask is None and segment_ids is None and window is None and (past == 0 or T == 1)
    if plain and not static:
        return None  # SDPA's is_causal (prefill) or attend-to-everything (one-token decode)
    S = keys if static else past + T
    q = index[:, None] if static else torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :S].bool()  # (B, 1, T, S)
    if segment_ids is not None:  # packing: attention never crosses a sample boundary
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])  # (B, 1, T, T)
    return allowed | (k == q)


def positions_from_segments(segment_ids: Tensor) -> Tensor:
    """Position ids that restart at 0 where each packed sample starts: (B, T) from segment ids (B, T)."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values  # (B, T) sample start
    return index - first


def positions_from_mask(attention_mask: Tensor, past: int, T: int, index: Tensor | None = None) -> Tensor:
    """Position ids that restart at 0 after left padding: (B, T) for the last T columns of the mask, or for the
    columns `index` (T,) of a static cache's step."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    return positions[:, index] if index is not None else positions[:, past : past + T]


class KVCache:
    """Pre-allocated keys and values for every layer, so decoding never re-allocates.

    `k[i]`/`v[i]` are layer i's (B, n_kv_head, max_len, head_dim), one tensor per layer: a compiled step then
    writes each in place (views of one stacked tensor would make the compiler copy the whole stack each step).
    `length` is how many positions are filled: the model writes each layer's new keys at [length, length + T)
    and advances `length` after the last layer.

    A static step (`index` set to the (T,) columns it writes, as `torch.compile`'s decode step does) writes
    there instead and attends over the columns its attention mask covers (all by default), masked: it reads no
    Python state of the cache, so the compiled graph needs no guard on it, and `length` is left to the
    caller.
    """

    def __init__(
        self,
        config: DecoderConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        for t in (*self.k, *self.v):  # a compiled step serves every batch size > 1 and cache length
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
        self.length = 0
        self.index: Tensor | None = None

    @property
    def max_len(self) -> int:
        """Number of positions the cache can hold."""
        return self.k[0].shape[2]

    @property
    def empty(self) -> bool:
        """Nothing cached yet (a static step never reads `length`, which the compiler would guard on)."""
        return self.index is None and self.length == 0

    def update(self, layer: int, k: Tensor, v: Tensor, keys: int | None = None) -> tuple[Tensor, Tensor]:
        """Store this step's (B, n_kv, T, hd) keys/values for `layer`; return all keys/values so far (a static
        step: the first `keys` columns, all by default)."""
        if self.index is not None:
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            return self.k[layer][:, :, :keys], self.v[layer][:, :, :keys]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def rows(self, index: Tensor) -> None:
        """Keep the rows `index` (R,) of every layer, in that order (a row may repeat)."""
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]

    def place(self, rows: slice, columns: slice, source: KVCache, source_rows: Tensor | slice = slice(None),
              source_columns: slice = slice(None)) -> None:  # fmt: skip
        """Copy `source`'s rows and columns into this cache's `rows` and `columns`, in every layer."""
        for mine, theirs in ((self.k, source.k), (self.v, source.v)):
            for dst, src in zip(mine, theirs, strict=True):
                dst[rows, :, columns] = src[source_rows, :, source_columns]


# -------------------------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Grouped-query attention with RoPE through `scaled_dot_product_attention`."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        C, qkv_bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(C, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(C, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(C, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.n_head * self.head_dim, C, bias=config.o_proj_bias)
        # Qwen3 normalises each head of q and k before RoPE; elsewhere these are identities with no weights.
        make_norm = (lambda: RMSNorm(self.head_dim, config.rms_norm_eps)) if config.qk_norm else nn.Identity
        self.q_norm, self.k_norm = make_norm(), make_norm()

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(
            1, 2
        )  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(
            1, 2
        )  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        is_causal = mask is None and (cache is None or cache.empty)
        if cache is not None:
            # (B, nkv, past + T, hd); a static step's mask always exists and gives the keys' count
            k, v = cache.update(self.layer_idx, k, v, mask.shape[-1] if mask is not None else None)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and T > 1, enable_gqa=self.n_kv_head != self.n_head
        )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


# --------------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        C, H, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(C, H, bias=bias)
        self.up_proj = Linear(C, H, bias=bias)
        self.down_proj = Linear(H, C, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ------------------------------------------------------------------------------------------------- block


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.window = config.sliding_window if is_sliding else None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ------------------------------------------------------------------------------------------------- model


class DecoderModel(nn.Module):
    """Embeddings, blocks and the final norm: token ids (B, T) → hidden states (B, T, C)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = empty_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._inv_freq: Tensor | None = (
            None  # fp32 whatever the weights' dtype; not a buffer, so .to() keeps it
        )

    def inv_freq(self, device: torch.device) -> Tensor:
        """The RoPE inverse frequencies on `device`, computed once per device."""
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.config, device)
        return self._inv_freq

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        *,
        segment_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Hidden states (B, T, C) of `input_ids` (B, T), or of `inputs_embeds` (B, T, C) when given (prompt
        tuning prepends learned vectors there). `segment_ids` (B, T) mark the samples of packed rows."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        # A static step (cache.index set) writes the columns `index` and reads no Python state of the cache.
        index = cache.index if cache is not None else None
        past = cache.length if cache is not None and index is None else 0
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed samples) cannot be combined with a KV cache")
        if position_ids is None:
            if segment_ids is not None:
                position_ids = positions_from_segments(segment_ids)
            elif attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, past, T, index)
            elif index is not None:
                position_ids = index.expand(B, T)
            else:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(self.inv_freq(x.device), position_ids, x.dtype)  # (B, T, hd)
        # One mask per distinct window (full and sliding layers), built once per forward.
        windows = {b.window for b in self.layers}
        keys = (
            0 if index is None else attention_mask.shape[1] if attention_mask is not None else cache.max_len
        )
        masks = {
            w: build_mask(attention_mask, past, T, w, x.device, segment_ids, index=index, keys=keys)
            for w in windows
        }
        for block in self.layers:
            x = block(x, cos, sin, masks[block.window], cache)
        if cache is not None and index is None:
            cache.length += T
        return self.norm(x)


class CausalLM(nn.Module):
    """A decoder with its LM head: logits, or per-token losses given targets (the one log-prob path)."""

    base_model_prefix: ClassVar[str] = "model"
    architectures: ClassVar[dict[str, str]] = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def hf_architecture(self) -> str:
        """The `architectures` entry HF uses for this family."""
        return self.architectures[self.config.model_type]

    @property
    def extra_positions(self) -> int:
        """Positions the model puts in front of the given tokens (and in the KV cache): 0; prompt tuning's
        virtual tokens in a prompt-tuned model."""
        return 0

    def tied_weights(self) -> dict[str, str]:
        """State-dict keys that share another key's tensor: {tied key: source key}."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def tie_weights(self) -> None:
        """Make tied parameters one tensor again (after building, `to_empty` or loading)."""
        tie_weights(self, self.tied_weights())

    def init_weights(self) -> None:
        """HF's init: normal(0, initializer_range) for linear and embedding weights, zero biases, unit norms."""
        self.tie_weights()
        init_weights(self, self.config.initializer_range)
        self.model._inv_freq = None

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        reduction: str = "mean",
        segment_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V) — (B, 1, V) with `last_only` — or, given targets (B, T), the cross-entropy.

        `reduction="none"` gives per-token losses (B, T) (0 where the target is IGNORE_INDEX): the negative
        log-probs SFT, DPO, RL and evaluation all read. "sum" and "mean" reduce over the counted tokens.
        """
        x = self.model(input_ids, attention_mask, position_ids, cache, segment_ids=segment_ids,
                       inputs_embeds=inputs_embeds)  # (B, T, C)  # fmt: skip
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x)
        shape = targets.shape  # (B, T)
        x, targets = x.flatten(0, 1), targets.flatten()  # (B*T, C), (B*T,)
        if torch.compiler.is_compiling():  # a data-dependent shape would break the graph: every position
            logits = self.lm_head(x).float()  # (B*T, V)
            loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
            return loss.view(shape) if reduction == "none" else loss
        # The head (C x V, and a V-wide softmax) runs only at counted positions: SFT trains ~40% of a packed
        # row, DPO only the replies.
        counted = targets != IGNORE_INDEX  # (B*T,)
        logits = self.lm_head(x[counted]).float()  # (N, V), fp32 for a stable log-softmax
        loss = F.cross_entropy(logits, targets[counted], reduction=reduction)
        return (
            loss.new_zeros(shape.numel()).masked_scatter(counted, loss).view(shape)
            if reduction == "none"
            else loss
        )


# -------------------------------------------------------------------------------- classification head


def last_token_index(input_ids: Tensor, pad_token_id: int | None) -> Tensor:
    """Index (B,) of each row's rightmost token that is not `pad_token_id`: the token HF classifies.

    transformers' rule (`GenericForSequenceClassification`), exactly: the attention mask is not read; a row
    of padding only gives 0; without a pad id, a batch of one uses its last token and a larger batch is an
    error. The rule finds the last real token under right and left padding alike, but a real token equal
    to the pad id (pad = EOS ending the text) is passed over as padding.
    """
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError("cannot classify a batch of several rows without a pad_token_id in the config")
        return torch.full((1,), T - 1, dtype=torch.long, device=input_ids.device)
    index = torch.arange(T, device=input_ids.device)  # (T,)
    return (index * (input_ids != pad_token_id)).argmax(-1)  # (B,)


class DecoderForSequenceClassification(nn.Module):
    """A decoder with a bias-free linear `score` on each row's last real token; returns logits (B, num_labels)."""

    base_model_prefix: ClassVar[str] = "model"
    architectures: ClassVar[dict[str, str]] = {
        "llama": "LlamaForSequenceClassification",
        "mistral": "MistralForSequenceClassification",
        "qwen2": "Qwen2ForSequenceClassification",
        "qwen3": "Qwen3ForSequenceClassification",
    }

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)

    @property
    def hf_architecture(self) -> str:
        """The `architectures` entry HF uses for this family."""
        return self.architectures[self.config.model_type]

    def tied_weights(self) -> dict[str, str]:
        """No tied weights: HF's classification models have no LM head to tie to the embeddings."""
        return {}

    def tie_weights(self) -> None:
        """Nothing to tie (the loader's contract)."""

    def init_weights(self) -> None:
        """HF's init: normal(0, initializer_range) for linear and embedding weights, zero biases, unit norms."""
        init_weights(self, self.config.initializer_range)
        self.model._inv_freq = None

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        *,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, num_labels) of the rightmost non-pad token of each row of `input_ids` (B, T).

        The pooled token follows HF (`last_token_index`), so right and left padding both pool the last real
        token. With left padding the logits still depend on the positions: given `attention_mask`, lmforge
        restarts positions after the padding (each row as if alone), while HF without `position_ids` counts
        the pads; pass `position_ids` to compare the two. Packed rows (`segment_ids`) pool only the row's
        last token, i.e. its last sample.
        """
        x = self.model(input_ids, attention_mask, position_ids, segment_ids=segment_ids)  # (B, T, C)
        last = last_token_index(input_ids, self.config.pad_token_id)  # (B,)
        pooled = x[torch.arange(x.shape[0], device=x.device), last]  # (B, C)
        return self.score(pooled)  # (B, num_labels)
