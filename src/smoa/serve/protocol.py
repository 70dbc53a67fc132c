"""Request models of the server, mirroring the OpenAI and LoRAX schemas (validation and hard limits here).

OpenAI fields the server does not implement are accepted and ignored (as OpenAI-compatible servers do); the
smoa extensions are ``route``, ``metadata``, ``strategy``, ``k`` and ``adapters``. Limits that depend on the
running server (the model's context, ``max_tokens`` and ``n`` caps) are checked by the serving layer, which
names the field in its error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AdapterPatch",
    "AdapterWeight",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerateParameters",
    "GenerateRequest",
    "MergedAdapters",
    "OptimizeRequest",
    "RouteRequest",
    "StreamOptions",
]

MAX_TEXT = 1_000_000  # characters of one text field (the body cap applies first)
MAX_ID = 256
Strategy = Literal["semantic", "task_based", "hybrid", "hierarchical"]
MetaValue = str | int | float | bool | None
Metadata = Annotated[dict[Annotated[str, Field(max_length=256)], MetaValue], Field(max_length=64)]
Tag = Annotated[str, Field(min_length=1, max_length=128)]
StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=8)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class AdapterWeight(_Model):
    """One member of an explicit mixture."""

    id: str = Field(min_length=1, max_length=MAX_ID)
    weight: float = Field(default=1.0, ge=-100.0, le=100.0, allow_inf_nan=False)


class StreamOptions(_Model):
    include_usage: bool = False


class _Sampling(_Model):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1, max_length=MAX_ID)
    max_tokens: int | None = Field(default=None, ge=1, le=10**7)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(min_length=1, max_length=256)] | StopList | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = Field(default=None, max_length=MAX_ID)
    ignore_eos: bool = False  # as vLLM: generate max_tokens tokens even past the EOS token
    # smoa extensions
    route: bool = False
    metadata: Metadata | None = None
    strategy: Strategy | None = None
    k: int | None = Field(default=None, ge=1, le=64)
    adapters: Annotated[list[AdapterWeight], Field(min_length=1, max_length=64)] | None = None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: (
        Annotated[str, Field(max_length=MAX_TEXT)]
        | Annotated[list[Annotated[str, Field(max_length=MAX_TEXT)]], Field(min_length=1, max_length=64)]
        | Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1, max_length=1_000_000)]
    )
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = Field(default=None, max_length=MAX_TEXT)


class TextPart(_Model):
    type: Literal["text"] = "text"
    text: str = Field(max_length=MAX_TEXT)


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_TEXT)] | Annotated[list[TextPart], Field(max_length=256)] | None = None
    name: str | None = Field(default=None, max_length=MAX_ID)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: int | None = Field(default=None, ge=1, le=10**7)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def token_cap(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- LoRAX ------------------------------------------------------------------------------------------------------------
class MergedAdapters(_Model):
    """LoRAX's per-request merge: ``linear`` is served as the exact mixture, the others are merged (cached)."""

    ids: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_ID)]], Field(min_length=1, max_length=64)]
    weights: Annotated[list[Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]], Field(min_length=1, max_length=64)]
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties", "svd", "cat", "magnitude_prune"] | None = None
    density: float = Field(default=1.0, gt=0.0, le=1.0)
    majority_sign_method: Literal["total", "frequency"] | None = None

    @field_validator("weights")
    @classmethod
    def _same_length(cls, v: list[float], info: Any) -> list[float]:
        ids = info.data.get("ids")
        if ids is not None and len(ids) != len(v):
            raise ValueError(f"`weights` has {len(v)} values for {len(ids)} `ids`")
        return v


class GenerateParameters(_Model):
    """LoRAX / TGI generation parameters (``typical_p``, ``watermark``, ``repetition_penalty`` are accepted and
    ignored)."""

    adapter_id: str | None = Field(default=None, max_length=MAX_ID)
    adapter_source: str | None = Field(default=None, max_length=64)
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = Field(default=None, max_length=4096)
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, ge=1, le=10**7)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    return_full_text: bool = False
    stop: StopList = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    temperature: float | None = Field(default=None, ge=0.0, le=100.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1, le=10**6)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    truncate: int | None = Field(default=None, ge=1, le=10**7)
    typical_p: float | None = Field(default=None, gt=0.0, le=1.0)
    best_of: int | None = Field(default=None, ge=1, le=1)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(default=None, ge=0, le=10)
    response_format: dict[str, Any] | None = None
    # smoa extensions
    route: bool = False
    metadata: Metadata | None = None
    strategy: Strategy | None = None


class GenerateRequest(_Model):
    """``POST /generate`` and ``/generate_stream`` (and LoRAX's ``POST /``, which dispatches on ``stream``)."""

    inputs: str = Field(max_length=MAX_TEXT)
    parameters: GenerateParameters | None = None
    stream: bool = False


# -- management -------------------------------------------------------------------------------------------------------
class AdapterPatch(_Model):
    """``PATCH /v1/adapters/{id}``: the fields given are replaced."""

    model_config = ConfigDict(extra="forbid")

    domain_tags: Annotated[list[Tag], Field(max_length=64)] | None = None
    skill_tags: Annotated[list[Tag], Field(max_length=64)] | None = None
    description: str | None = Field(default=None, max_length=10_000)
    examples: Annotated[list[Annotated[str, Field(max_length=10_000)]], Field(max_length=1000)] | None = None


class RouteRequest(_Model):
    """``POST /v1/route``: route a text without generating."""

    query: str = Field(max_length=MAX_TEXT)
    metadata: Metadata | None = None
    strategy: Strategy | None = None
    k: int | None = Field(default=None, ge=1, le=64)


class OptimizeRequest(_Model):
    """``POST /v1/optimize`` (all optional): which passes, and ``dry_run`` to only report."""

    model_config = ConfigDict(extra="forbid")

    merge: bool | None = None
    prune: bool | None = None
    dry_run: bool = False
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    method: Literal["svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"] | None = None
