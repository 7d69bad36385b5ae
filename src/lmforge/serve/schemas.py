"""The OpenAI request bodies `lmforge serve` reads (pydantic; a field it does not know is a 400 naming it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    """What chat and text completions share: the model and the sampling settings of `lmforge generate`."""

    model_config = ConfigDict(extra="forbid")

    model: str
    """The served model's name (`GET /v1/models`)."""
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    """Tokens to generate at most (default: the model's generation_config or 256)."""
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    """0: greedy; default: the model's generation_config (greedy when it does not sample)."""
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    """Nucleus sampling mass."""
    n: Annotated[int, Field(ge=1, le=16)] = 1
    """Samples per prompt."""
    stop: str | list[str] | None = None
    """Up to 4 strings that end a sample (not included in its text)."""
    seed: Annotated[int, Field(ge=0, le=2**64 - 1)] | None = None
    """Seed of this request's samples."""
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    """OpenAI's presence penalty."""
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    """OpenAI's frequency penalty."""
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    """Token id (as a string) → bias added to its logit."""
    # lmforge generate's other settings, under vLLM's names (the openai client sends them with `extra_body`)
    top_k: Annotated[int, Field(ge=0)] | None = None
    """Sample among the k most likely tokens; 0 = off."""
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None
    """Drop tokens less likely than min_p x the top token's probability; 0 = off."""
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    """HF's repetition penalty over prompt + output; 1 = off."""
    no_repeat_ngram_size: Annotated[int, Field(ge=0)] | None = None
    """Never repeat an n-gram of this size; 0 = off."""
    stream: bool = False
    """Server-sent events, ending with `data: [DONE]`."""
    stream_options: dict[Literal["include_usage"], bool] | None = None
    """{"include_usage": true}: a last chunk with the usage."""
    user: str | None = None
    """An end-user id: an A/B route sends the same user to the same variant, and the request log records it."""


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    """The newer name of max_tokens."""
    logprobs: bool = False
    """Log-probs of the chosen tokens."""
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    """Alternatives per token (needs logprobs)."""
    rag: bool | str | None = None
    """lmforge: retrieve passages for the last user turn from the server's RAG index (true: the first one
    `--rag` gave; a string: the index of that name); the response carries `citations`."""
    rag_k: Annotated[int, Field(ge=1, le=50)] | None = None
    """lmforge: passages to retrieve (default 5)."""


class CompletionRequest(_Request):
    """POST /v1/completions (one text prompt)."""

    prompt: str
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    """Alternatives per token (OpenAI's legacy integer form)."""
    echo: Literal[False] = False
    """Echoing the prompt is not supported."""


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings (an encoder model)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    """A text or a list of texts."""
    encoding_format: Literal["float", "base64"] = "float"
    """Vectors as lists of floats, or base64 of their little-endian float32 bytes (the openai client's default)."""
    user: str | None = None
    """An end-user id (accepted for client compatibility)."""


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a user's rating of a response this server gave."""

    model_config = ConfigDict(extra="forbid")

    response_id: str
    """The chat completion's `id`."""
    rating: Literal["up", "down"]
    """Thumbs up or down."""
    comment: str | None = None
    """What the user said, if anything."""
