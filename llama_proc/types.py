"""The shapes of llama-server's requests and answers, for type checkers.

Every answer is a plain ``dict`` parsed from JSON: these :class:`~typing.TypedDict` classes only
describe it (they check nothing at run time). They follow what llama-server sends on its
OpenAI-compatible endpoints; keys that only some versions or some requests send are not required
(read them with ``.get()``).

**Requests.** Every method accepts any ``Mapping[str, object]``, so existing code that builds requests
as ``dict[str, Any]`` keeps type-checking. Annotate a request with one of the request types below
and the type checker catches a mistyped key or a wrong value type, and knows what the call returns::

    from llama_proc.types import ChatCompletionRequest

    request: ChatCompletionRequest = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}
    reply = server.chat_completions(request)                 # a ChatCompletion
    stream = server.chat_completions(request, stream=True)   # a Stream[ChatCompletionChunk]

A key llama-server knows but these types do not (``"speculative.n_max"``, a new sampler setting)
is an error in an annotated request: build that request as ``dict[str, Any]`` instead.

**Streaming.** The keyword argument ``stream=True`` (or ``False``) sets the request's ``"stream"``
key and decides the return type. Without it, the type of the request decides:

* :class:`ChatCompletionRequest` (whose ``"stream"`` may only be ``False``), or a dict literal
  that fits it, returns a :class:`ChatCompletion`;
* :class:`ChatCompletionStreamRequest` (``"stream": True`` required), or a dict literal with
  ``"stream": True`` that fits it, returns a ``Stream[ChatCompletionChunk]``;
* any other mapping (``dict[str, Any]``) returns ``Any``, as before these types existed, since only
  its contents at run time say which: pass ``stream=`` to get the precise type.

The same holds for :meth:`~llama_proc.client.Endpoints.completions` and
:meth:`~llama_proc.client.Endpoints.infill` with their request types.
"""

# no ``from __future__ import annotations``: the annotations below stay evaluable at run time
# (typing.get_type_hints) on every supported Python, so they spell Optional and Union

from types import TracebackType
from typing import Any, Iterator, Literal, Mapping, Optional, Protocol, Sequence, TypedDict, TypeVar, Union

__all__ = [
    "ChatCompletion",
    "ChatCompletionChoice",
    "ChatCompletionChunk",
    "ChatCompletionChunkChoice",
    "ChatCompletionChunkDelta",
    "ChatCompletionMessage",
    "ChatCompletionRequest",
    "ChatCompletionStreamRequest",
    "ChatMessage",
    "ChoiceLogprobs",
    "ChunkStream",
    "ChunkToolCall",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionChunkChoice",
    "CompletionRequest",
    "CompletionStreamRequest",
    "ContentPart",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "Embedding",
    "EmbeddingsRequest",
    "EmbeddingsResponse",
    "EmbeddingsUsage",
    "HealthResponse",
    "InfillChunk",
    "InfillExtra",
    "InfillRequest",
    "InfillResponse",
    "InfillStreamRequest",
    "Model",
    "ModelsResponse",
    "PromptProgress",
    "PropsResponse",
    "RerankRequest",
    "RerankResponse",
    "RerankResult",
    "Slot",
    "StreamOptions",
    "Timings",
    "TokenLogprob",
    "TokenPiece",
    "TokenizeRequest",
    "TokenizeResponse",
    "ToolCall",
    "ToolCallFunction",
    "TopLogprob",
    "Usage",
]

T_co = TypeVar("T_co", covariant=True)


class ChunkStream(Protocol[T_co]):
    """What a streamed answer is, whoever made it: an iterator of chunks that is also a context
    manager closing it. :class:`~llama_proc.Stream` is one, and so is
    :class:`~llama_proc.testing.FakeStream`; the :class:`~llama_proc.Server` protocol promises no more."""

    def __iter__(self) -> Iterator[T_co]: ...

    def __next__(self) -> T_co: ...

    def __enter__(self) -> "ChunkStream[T_co]": ...

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None: ...

    @property
    def closed(self) -> bool:
        """True once the stream has been closed."""
        ...

    def close(self) -> None:
        """Stop the stream and free its connection (idempotent)."""
        ...


# -- shared pieces --------------------------------------------------------------------------------


class _UsageBase(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _PromptTokensDetails(TypedDict):
    cached_tokens: int


class Usage(_UsageBase, total=False):
    """Token counts of a completion; ``prompt_tokens_details["cached_tokens"]`` are the prompt
    tokens taken from the cache."""

    prompt_tokens_details: _PromptTokensDetails


class _TimingsBase(TypedDict):
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


class Timings(_TimingsBase, total=False):
    """llama-server's timings of a completion (``draft_*`` with speculative decoding)."""

    cache_n: int
    draft_n: int
    draft_n_accepted: int


class PromptProgress(TypedDict):
    """Progress of prompt processing, in stream chunks of a request with ``"return_progress": True``."""

    total: int
    cache: int
    processed: int
    time_ms: float


class _TopLogprobBase(TypedDict):
    id: int
    token: str
    bytes: list[int]


class TopLogprob(_TopLogprobBase, total=False):
    """One candidate token: ``logprob``, or ``prob`` with ``"post_sampling_probs": True``."""

    logprob: float
    prob: float


class TokenLogprob(_TopLogprobBase, total=False):
    """A generated token and its most likely alternatives (``top_probs`` with
    ``"post_sampling_probs": True``)."""

    logprob: float
    prob: float
    top_logprobs: list[TopLogprob]
    top_probs: list[TopLogprob]


class ChoiceLogprobs(TypedDict):
    """The ``logprobs`` of a choice, when the request asked for them."""

    content: list[TokenLogprob]


class ToolCallFunction(TypedDict):
    """The function a tool call invokes; ``arguments`` is a JSON text."""

    name: str
    arguments: str


class _ToolCallBase(TypedDict):
    type: str
    function: ToolCallFunction


class ToolCall(_ToolCallBase, total=False):
    """A tool call of an assistant message (``type`` is ``"function"``)."""

    id: str


class StreamOptions(TypedDict, total=False):
    """``"stream_options"``: ``include_usage`` adds a last chunk with the usage and no choices."""

    include_usage: bool


class _ImageURL(TypedDict, total=False):
    url: str
    detail: str


class _InputAudio(TypedDict, total=False):
    data: str
    format: str


class ContentPart(TypedDict, total=False):
    """One part of a message's content: ``{"type": "text", "text": ...}``,
    ``{"type": "image_url", "image_url": {"url": ...}}`` or ``{"type": "input_audio", ...}``."""

    type: str
    text: str
    image_url: _ImageURL
    input_audio: _InputAudio


class _ChatMessageBase(TypedDict):
    role: str


class ChatMessage(_ChatMessageBase, total=False):
    """A message of a chat request: ``role`` is ``"system"``, ``"user"``, ``"assistant"`` or ``"tool"``."""

    content: Union[str, Sequence[ContentPart], None]
    name: str
    tool_calls: Sequence[ToolCall]
    tool_call_id: str
    reasoning_content: str


# -- generation settings, shared by the generation requests ----------------------------------------


class _SamplingParams(TypedDict, total=False):
    # OpenAI's settings
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: Union[str, Sequence[str]]
    seed: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Union[Mapping[str, float], Sequence[Sequence[object]]]
    user: str
    # llama-server's own
    n_predict: int
    n_keep: int
    n_indent: int
    n_probs: int
    top_k: int
    min_p: float
    typical_p: float
    top_n_sigma: float
    xtc_probability: float
    xtc_threshold: float
    dynatemp_range: float
    dynatemp_exponent: float
    repeat_last_n: int
    repeat_penalty: float
    dry_multiplier: float
    dry_base: float
    dry_allowed_length: int
    dry_penalty_last_n: int
    dry_sequence_breakers: Sequence[str]
    mirostat: int
    mirostat_tau: float
    mirostat_eta: float
    min_keep: int
    samplers: Sequence[str]
    grammar: str
    json_schema: Mapping[str, object]
    ignore_eos: bool
    cache_prompt: bool
    id_slot: int
    return_tokens: bool
    return_progress: bool
    post_sampling_probs: bool
    timings_per_token: bool
    t_max_predict_ms: int
    response_fields: Sequence[str]
    lora: Sequence[Mapping[str, object]]


# -- /v1/chat/completions -----------------------------------------------------------------------


class _ChatCompletionRequired(TypedDict):
    messages: Sequence[ChatMessage]


class _ChatCompletionParams(_ChatCompletionRequired, _SamplingParams, total=False):
    max_completion_tokens: int
    logprobs: bool
    top_logprobs: int
    response_format: Mapping[str, object]
    tools: Sequence[Mapping[str, object]]
    tool_choice: Union[str, Mapping[str, object]]
    parallel_tool_calls: bool
    reasoning_format: str
    reasoning_effort: str
    chat_template_kwargs: Mapping[str, object]
    add_generation_prompt: bool
    continue_final_message: bool


class ChatCompletionRequest(_ChatCompletionParams, total=False):
    """A request to ``/v1/chat/completions`` answered at once: ``messages`` and the generation
    settings of OpenAI and of llama-server. ``"stream"`` may only be ``False`` here; a streamed
    request is a :class:`ChatCompletionStreamRequest`, or pass ``stream=True`` to the call."""

    stream: Literal[False]


class _ChatCompletionStreamRequired(_ChatCompletionParams):
    stream: Literal[True]


class ChatCompletionStreamRequest(_ChatCompletionStreamRequired, total=False):
    """A streamed request to ``/v1/chat/completions``: as :class:`ChatCompletionRequest`, with
    ``"stream": True`` and optional ``"stream_options"``."""

    stream_options: StreamOptions


class _ChatCompletionMessageBase(TypedDict):
    role: str
    content: Optional[str]


class ChatCompletionMessage(_ChatCompletionMessageBase, total=False):
    """The assistant's message in a chat answer (``reasoning_content`` when the model reasons and
    the server separates it; ``tool_calls`` when it calls tools)."""

    reasoning_content: str
    tool_calls: list[ToolCall]


class _ChatCompletionChoiceBase(TypedDict):
    index: int
    message: ChatCompletionMessage
    finish_reason: str


class ChatCompletionChoice(_ChatCompletionChoiceBase, total=False):
    """One choice of a chat answer; ``finish_reason`` is ``"stop"``, ``"length"`` or ``"tool_calls"``."""

    logprobs: ChoiceLogprobs


class _ChatCompletionBase(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChatCompletion(_ChatCompletionBase, total=False):
    """The answer of ``/v1/chat/completions``: ``reply["choices"][0]["message"]["content"]``."""

    system_fingerprint: str
    timings: Timings


class _ChunkToolCallFunction(TypedDict, total=False):
    name: str
    arguments: str


class _ChunkToolCallBase(TypedDict):
    index: int


class ChunkToolCall(_ChunkToolCallBase, total=False):
    """A piece of a tool call in a stream chunk: its ``id``, ``type`` and name come first, then
    its ``function["arguments"]`` in pieces."""

    id: str
    type: str
    function: _ChunkToolCallFunction


class ChatCompletionChunkDelta(TypedDict, total=False):
    """What a stream chunk adds to the message: the first has ``role`` (and ``content`` None)."""

    role: str
    content: Optional[str]
    reasoning_content: str
    tool_calls: list[ChunkToolCall]


class _ChatCompletionChunkChoiceBase(TypedDict):
    index: int
    delta: ChatCompletionChunkDelta
    finish_reason: Optional[str]


class ChatCompletionChunkChoice(_ChatCompletionChunkChoiceBase, total=False):
    """One choice of a stream chunk; ``finish_reason`` is None until the last."""

    logprobs: ChoiceLogprobs


class _ChatCompletionChunkBase(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]


class ChatCompletionChunk(_ChatCompletionChunkBase, total=False):
    """One chunk of a streamed chat answer: ``chunk["choices"][0]["delta"].get("content")``.
    With ``"stream_options": {"include_usage": True}`` a last chunk has no choices and the ``usage``."""

    system_fingerprint: str
    usage: Usage
    timings: Timings
    prompt_progress: PromptProgress


# -- /v1/completions ----------------------------------------------------------------------------

#: A prompt: text, tokens, text and tokens mixed, or several prompts.
_Prompt = Union[str, Sequence[Union[str, int]], Sequence[Sequence[Union[str, int]]]]


class _CompletionRequired(TypedDict):
    prompt: _Prompt


class _CompletionParams(_CompletionRequired, _SamplingParams, total=False):
    logprobs: int
    echo: bool


class CompletionRequest(_CompletionParams, total=False):
    """A request to ``/v1/completions`` (text completion, OpenAI's legacy API) answered at once;
    a streamed one is a :class:`CompletionStreamRequest`."""

    stream: Literal[False]


class _CompletionStreamRequired(_CompletionParams):
    stream: Literal[True]


class CompletionStreamRequest(_CompletionStreamRequired, total=False):
    """A streamed request to ``/v1/completions``."""

    stream_options: StreamOptions


class CompletionChoice(TypedDict):
    """One choice of a text completion."""

    text: str
    index: int
    logprobs: Optional[ChoiceLogprobs]
    finish_reason: str


class _CompletionBase(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Completion(_CompletionBase, total=False):
    """The answer of ``/v1/completions``: ``reply["choices"][0]["text"]``."""

    system_fingerprint: str
    timings: Timings


class CompletionChunkChoice(TypedDict):
    """One choice of a text completion chunk; ``finish_reason`` is None until the last."""

    text: str
    index: int
    logprobs: Optional[ChoiceLogprobs]
    finish_reason: Optional[str]


class _CompletionChunkBase(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]


class CompletionChunk(_CompletionChunkBase, total=False):
    """One chunk of a streamed text completion: ``chunk["choices"][0]["text"]`` (the last one
    carries the ``usage``)."""

    system_fingerprint: str
    usage: Usage
    timings: Timings
    prompt_progress: PromptProgress


# -- /infill ------------------------------------------------------------------------------------


class _InfillExtraBase(TypedDict):
    text: str


class InfillExtra(_InfillExtraBase, total=False):
    """A piece of context for infilling: another file's ``text`` and its ``filename``."""

    filename: str


class _InfillRequired(TypedDict):
    input_prefix: str
    input_suffix: str


class _InfillParams(_InfillRequired, _SamplingParams, total=False):
    input_extra: Sequence[InfillExtra]
    prompt: str


class InfillRequest(_InfillParams, total=False):
    """A request to ``/infill`` (code infilling) answered at once: the code before and after the
    gap, other files as ``input_extra``, and the generation settings."""

    stream: Literal[False]


class _InfillStreamRequired(_InfillParams):
    stream: Literal[True]


class InfillStreamRequest(_InfillStreamRequired, total=False):
    """A streamed request to ``/infill``."""


class _InfillChunkBase(TypedDict):
    content: str
    stop: bool


class InfillChunk(_InfillChunkBase, total=False):
    """One chunk of a streamed infill (llama-server's own format, not OpenAI's): the ``content``
    generated; the last one has ``"stop": True`` and the totals."""

    index: int
    id_slot: int
    tokens: list[int]
    tokens_predicted: int
    tokens_evaluated: int
    timings: Timings
    model: str
    stop_type: str
    stopping_word: str
    tokens_cached: int
    truncated: bool
    generation_settings: dict[str, Any]


class InfillResponse(_InfillChunkBase, total=False):
    """The answer of ``/infill`` (llama-server's own format): ``reply["content"]`` fills the gap."""

    index: int
    id_slot: int
    tokens: list[int]
    model: str
    prompt: str
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int
    truncated: bool
    has_new_line: bool
    stop_type: str
    stopping_word: str
    timings: Timings
    generation_settings: dict[str, Any]


# -- /v1/embeddings, /v1/rerank -----------------------------------------------------------------


class _EmbeddingsRequired(TypedDict):
    input: Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]]


class EmbeddingsRequest(_EmbeddingsRequired, total=False):
    """A request to ``/v1/embeddings``: one text, several, or tokens."""

    model: str
    encoding_format: Literal["float", "base64"]


class Embedding(TypedDict):
    """One input's vector. With ``"encoding_format": "base64"`` the server sends ``embedding`` as
    base64 text (little-endian float32) instead of a list."""

    object: Literal["embedding"]
    index: int
    embedding: list[float]


class EmbeddingsUsage(TypedDict):
    """Tokens read for an embeddings or rerank request."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(TypedDict):
    """The answer of ``/v1/embeddings``: ``reply["data"][i]["embedding"]`` for input ``i``."""

    object: Literal["list"]
    model: str
    data: list[Embedding]
    usage: EmbeddingsUsage


class _RerankRequired(TypedDict):
    query: str
    documents: Sequence[str]


class RerankRequest(_RerankRequired, total=False):
    """A request to ``/v1/rerank``: the documents to order by relevance to ``query``."""

    model: str
    top_n: int


class RerankResult(TypedDict):
    """A document's ``index`` in the request and its score."""

    index: int
    relevance_score: float


class RerankResponse(TypedDict):
    """The answer of ``/v1/rerank``: ``results``, most relevant first."""

    model: str
    object: Literal["list"]
    usage: EmbeddingsUsage
    results: list[RerankResult]


# -- /tokenize, /detokenize ---------------------------------------------------------------------


class _TokenizeRequired(TypedDict):
    content: str


class TokenizeRequest(_TokenizeRequired, total=False):
    """A request to ``/tokenize``. With ``"with_pieces": True`` each token comes back as a
    :class:`TokenPiece` instead of an ``int``."""

    add_special: bool
    parse_special: bool
    with_pieces: bool


class TokenPiece(TypedDict):
    """A token with its text (its bytes as a list of ints when they are not valid UTF-8)."""

    id: int
    piece: Union[str, list[int]]


class TokenizeResponse(TypedDict):
    """The answer of ``/tokenize``: the token ids (:class:`TokenPiece` dicts with ``with_pieces``)."""

    tokens: list[int]


class DetokenizeRequest(TypedDict):
    """A request to ``/detokenize``."""

    tokens: Sequence[int]


class DetokenizeResponse(TypedDict):
    """The answer of ``/detokenize``: the text."""

    content: str


# -- server state -------------------------------------------------------------------------------


class _HealthBase(TypedDict):
    status: str


class HealthResponse(_HealthBase, total=False):
    """The answer of ``/health``: ``{"status": "ok"}`` (some versions add slot counts)."""

    slots_idle: int
    slots_processing: int


class _Modalities(TypedDict, total=False):
    vision: bool
    audio: bool
    video: bool


class _PropsBase(TypedDict):
    default_generation_settings: dict[str, Any]
    total_slots: int
    model_path: str
    chat_template: str


class PropsResponse(_PropsBase, total=False):
    """The answer of ``/props``: the server's settings (``default_generation_settings["n_ctx"]``
    is each slot's context), chat template, build and capabilities."""

    model_alias: str
    model_ftype: str
    build_info: str
    modalities: _Modalities
    bos_token: str
    eos_token: str
    chat_template_tool_use: str
    chat_template_caps: dict[str, Any]
    endpoint_slots: bool
    endpoint_props: bool
    endpoint_metrics: bool
    media_marker: str
    ui: bool
    ui_settings: dict[str, Any]
    is_sleeping: bool


class _ModelBase(TypedDict):
    id: str
    object: Literal["model"]


class Model(_ModelBase, total=False):
    """One model of ``/v1/models``: ``id`` is the alias that requests name as ``"model"``; ``meta``
    has its vocabulary, context and parameter counts."""

    created: int
    owned_by: str
    aliases: list[str]
    tags: list[str]
    architecture: dict[str, Any]
    meta: dict[str, Any]


class _ModelsBase(TypedDict):
    object: Literal["list"]
    data: list[Model]


class ModelsResponse(_ModelsBase, total=False):
    """The answer of ``/v1/models``: OpenAI's ``data``, and the same models in another format
    under ``models``."""

    models: list[dict[str, Any]]


class _SlotBase(TypedDict):
    id: int
    n_ctx: int
    is_processing: bool


class Slot(_SlotBase, total=False):
    """One processing slot of ``/slots`` (the task's ``params`` and ``prompt`` once it ran one)."""

    id_task: int
    speculative: bool
    n_prompt_tokens: int
    n_prompt_tokens_processed: int
    n_prompt_tokens_cache: int
    params: dict[str, Any]
    next_token: list[dict[str, Any]]
    prompt: str
    generated: str
