"""Server-sent events: bytes -> events -> a :class:`Stream` of chunk dicts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar, cast

import attrs

from ._transport import translate_error
from .errors import APIStreamError, APITimeoutError

if TYPE_CHECKING:
    import requests

__all__ = ["SSEDecoder", "ServerSentEvent", "Stream"]

_EOL = re.compile(rb"\r\n|\r|\n")

#: The type of a stream's chunks (:class:`~llama_proc.types.ChatCompletionChunk`, ...).
T_co = TypeVar("T_co", covariant=True)


@attrs.frozen
class ServerSentEvent:
    """One event of an SSE stream."""

    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental SSE decoder.

    Lines end at CR, LF or CRLF only (a CRLF split across two chunks counts once), so a U+2028 or
    U+0085 inside JSON never splits an event; comments (``:``) are skipped; multi-line ``data`` is
    joined with LF as the specification says.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._skip_lf = False
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> Iterator[ServerSentEvent]:
        """Feed bytes; yields every event they complete."""
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" not in buffer:  # the usual case: LF line ends, split without the regex
            *lines, self._buffer = buffer.split(b"\n")
            for line in lines:
                event = self._line(line)
                if event is not None:
                    yield event
            return
        start = 0
        for match in _EOL.finditer(buffer):
            line = buffer[start : match.start()]
            start = match.end()
            if match.group() == b"\r" and start == len(buffer):
                self._skip_lf = True  # a LF may follow in the next chunk
            event = self._line(line)
            if event is not None:
                yield event
        self._buffer = buffer[start:]

    def events(self, chunk: bytes) -> Iterator[tuple[str | None, str | bytes]]:
        """``(event name, data)`` of each event that ``chunk`` completes. A chunk that is exactly
        one ``data:`` event, with nothing pending (how llama-server sends each token), skips the
        general parsing, and its data stays bytes."""
        if (
            chunk[:6] == b"data: "
            and chunk[-2:] == b"\n\n"
            and not self._buffer
            and not self._data
            and self._event is None
            and chunk.count(b"\n") == 2
            and b"\r" not in chunk
        ):
            self._skip_lf = False
            yield None, chunk[6:-2]
            return
        for event in self.feed(chunk):
            yield event.event, event.data

    def flush(self) -> Iterator[ServerSentEvent]:
        """At end of input: the last line, and an event left without its blank line."""
        if self._buffer:
            event = self._line(self._buffer)
            self._buffer = b""
            if event is not None:
                yield event
        event = self._line(b"")
        if event is not None:
            yield event

    def _line(self, raw: bytes) -> ServerSentEvent | None:
        if not raw:
            if not self._data and self._event is None:
                return None
            event = ServerSentEvent("\n".join(self._data), self._event, self._id, self._retry)
            self._data, self._event, self._retry = [], None, None
            return event
        if raw[:6] == b"data: ":  # the usual line, without the general parsing below
            self._data.append(raw[6:].decode("utf-8", errors="replace"))
            return None
        if raw[:1] == b":":
            return None
        line = raw.decode("utf-8", errors="replace")
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None


def iter_events(chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    """Decode an iterable of byte chunks into events."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.flush()


class Stream(Iterator[T_co]):
    """The chunks of a streamed completion, as dicts.

    Generic in the chunk's type for type checkers: ``chat_completions(..., stream=True)`` returns a
    ``Stream[ChatCompletionChunk]``, ``completions`` a ``Stream[CompletionChunk]`` (see
    :mod:`llama_proc.types`). At run time every chunk is the dict parsed from the event's JSON.

    Iterate it, or use it as a context manager so that an early ``break`` still closes the
    connection (the server then frees the slot). It stops at ``data: [DONE]`` and raises
    :class:`~llama_proc.errors.APIStreamError` for an error event,
    :class:`~llama_proc.errors.APIConnectionError` if the connection breaks.
    """

    def __init__(
        self,
        response: requests.Response,
        *,
        url: str = "",
        on_close: Callable[[], None] | None = None,
        error_hint: Callable[[], str] | None = None,
        on_done: Callable[[], None] | None = None,
        on_timeout: Callable[[], None] | None = None,
    ) -> None:
        #: The underlying response (already checked for an error status).
        self.response = response
        self.url = url
        self._on_close: list[Callable[[], None]] = [on_close] if on_close is not None else []
        self._error_hint = error_hint
        self._on_done = on_done
        self._on_timeout = on_timeout
        self._closed = False
        self._reading = False  # a thread is inside a read of the body
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._iterator = self._chunks()

    def __iter__(self) -> Stream[T_co]:
        return self

    def __del__(self) -> None:
        # a stream dropped without being read or closed gives its connection back
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()

    def __next__(self) -> T_co:
        return next(self._iterator)

    def __enter__(self) -> Stream[T_co]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once the response has been closed."""
        return self._closed

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the stream is closed (at its end, on error, or on an early close);
        at once if it is closed already."""
        if self._closed:
            callback()
        else:
            self._on_close.append(callback)

    def close(self) -> None:
        """Close the response (idempotent). Unread data is discarded and the connection dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reading = self._reading
        try:
            if os.getpid() == self._pid:
                # a thread blocked reading this stream wakes now, not at its read timeout (closing
                # the socket alone does not wake it); never done in a forked child, whose socket is
                # shared with the parent
                with contextlib.suppress(ValueError, RuntimeError, OSError, AttributeError):
                    self.response.raw.shutdown()
            if not reading:
                self.response.close()
            # else the woken reader closes the response itself: two threads releasing one
            # connection could put it back into the pool twice
        finally:
            for callback in self._on_close:
                callback()

    def _raw_chunks(self) -> Iterator[bytes]:
        """The body as it arrives: whatever the socket has, never more than 64 KiB at a time
        (whatever sizes the server claims)."""
        from ._adapter import READ_CHUNK, TRANSPORT_ERRORS

        raw = self.response.raw
        # urllib3 decodes only what the server compressed; an identity stream (llama-server's)
        # skips its decoder buffers on every read
        decode = bool(self.response.headers.get("Content-Encoding"))
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    self._reading = True
                try:
                    data = raw.read1(READ_CHUNK, decode_content=decode)
                finally:
                    with self._lock:
                        self._reading = False
                        closed_meanwhile = self._closed
                    if closed_meanwhile:
                        self.response.close()  # close() left it to this thread
                if not data or closed_meanwhile:
                    return
                yield data
        except Exception as exc:
            if self._closed:
                return  # closed by another thread while this one read: the stream simply ends
            if not isinstance(exc, TRANSPORT_ERRORS):
                raise
            hint = self._error_hint() if self._error_hint else ""
            error = translate_error(exc, self.url, ("the stream broke; " + hint) if hint else "the stream broke")
            if isinstance(error, APITimeoutError) and self._on_timeout is not None:
                self._on_timeout()
            raise error from None

    def _chunks(self) -> Iterator[T_co]:
        decoder = SSEDecoder()
        try:
            for data in self._raw_chunks():
                for name, payload in decoder.events(data):
                    if payload == b"[DONE]" or payload == "[DONE]":
                        if self._on_done is not None:
                            self._on_done()
                        return
                    if payload:
                        yield self._parse(name, payload)
            for event in decoder.flush():
                if event.data == "[DONE]":
                    if self._on_done is not None:
                        self._on_done()
                    return
                if event.data:
                    yield self._parse(event.event, event.data)
        finally:
            self.close()

    def _parse(self, name: str | None, data: str | bytes) -> T_co:
        """One event's chunk; an error event raises :class:`~llama_proc.errors.APIStreamError`."""
        try:
            payload = json.loads(data)
        except ValueError:
            text = data if isinstance(data, str) else data.decode("utf-8", errors="replace")
            raise APIStreamError(
                500, {"error": {"message": f"invalid JSON in stream: {text[:200]}"}}, self.url
            ) from None
        if name == "error" or (isinstance(payload, dict) and "error" in payload and "choices" not in payload):
            err = payload.get("error", payload) if isinstance(payload, dict) else payload
            code = err.get("code", 500) if isinstance(err, dict) else 500
            raise APIStreamError(code if isinstance(code, int) else 500, payload, self.url)
        return cast("T_co", payload)
