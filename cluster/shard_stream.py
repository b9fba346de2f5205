"""One request's engine outputs as ``ShardChunk``s, on the replica: incremental text,
stop strings, and token log-probabilities as text and bytes.

Vocabulary:
- *stop string*: a string of the request's ``stop``; the text ends before its first
  occurrence (checked once ``min_tokens`` tokens are generated), the chunk that holds it
  finishes the choice with ``stop`` and the replica then aborts the engine request;
- *stop token*: an end-of-turn token. The engine's scheduler ends the request at one (not
  here); as a special token it decodes to no text.

NOTE: stop strings are handled here and nowhere else (``cut_at_stop``): the replica has the
tokens, so it knows which logprob entries fall before the cut, and it stops generating at
once instead of after ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from dspark.cluster.payloads import Alternative, ShardChunk, ShardRequest, TokenEntry
from dspark.models.generation import SamplingParams, TokenLogprob
from dspark.models.tokenizer import StreamDecoder, Tokenizer
from dspark.workers.engine import RequestOutput


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character map (GPT-2's)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = list(kept), 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(kept, chars)}


_BYTE_OF = _byte_decoder()


class TokenTexts:
    """Token ids as text and UTF-8 bytes (cached per replica): a byte-level piece of a
    character may not be valid UTF-8 on its own, and its text then holds U+FFFD."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def text(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        cached = self._cache.get(token_id)
        if cached is None:
            inner = self.tokenizer.inner
            if token_id in self.tokenizer.special_ids:
                raw = inner.id_to_token(token_id).encode()
            else:
                raw = bytes(_BYTE_OF.get(ch, 0) for ch in inner.id_to_token(token_id) or "")
            cached = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), tuple(raw))
        return cached

    def entry(self, lp: TokenLogprob) -> TokenEntry:
        token, raw = self.text(lp.token_id)
        return TokenEntry(token, raw, lp.logprob,
                          tuple(Alternative(*self.text(t), value) for t, value in lp.top))

    def prompt_entries(self, prompt_ids: Sequence[int],
                       scores: Sequence[TokenLogprob | None]) -> tuple[TokenEntry, ...]:
        """One entry per prompt token; the first, without context, has no logprob."""
        return tuple(self.entry(TokenLogprob(t, None, []) if lp is None else lp)
                     for t, lp in zip(prompt_ids, scores))


def cut_at_stop(text: str, stops: Sequence[str], already: int) -> int | None:
    """Where ``text`` ends: before the earliest stop string that ends after its first
    ``already`` characters (text already streamed); None when none does."""
    best = None
    for stop in stops:
        pos = text.find(stop, max(0, already - len(stop) + 1))
        if pos != -1 and (best is None or pos < best):
            best = pos
    return best


def finish_reason(reason: str | None) -> str:
    """The OpenAI finish reason of an engine's (``stop``, ``length`` or an error's)."""
    return "stop" if reason in ("stop", None) else "length" if reason == "length" else reason


class ChunkStream:
    """The chunks of one request, one per engine output; ``done`` once a stop string ended
    it (the caller then stops reading the engine, which aborts the request)."""

    def __init__(self, texts: TokenTexts, request: ShardRequest, prompt_ids: list[int],
                 params: SamplingParams, replica: str) -> None:
        self.texts, self.request, self.params = texts, request, params
        self.prompt_ids, self.replica = prompt_ids, replica
        self.decoder = StreamDecoder(texts.tokenizer)
        self.text, self.produced, self.first, self.done = "", 0, True, False
        self.last: ShardChunk | None = None

    def push(self, out: RequestOutput) -> ShardChunk:
        head = self._head(out) if self.first else {}
        self.first = False
        if self.request.max_tokens == 0:  # the prompt's scores were the point: drop the token
            self.done = True
            return self._chunk("", "length", out, None if self.params.logprobs is None else (),
                               head, produced=0)
        pieces = []
        for k, token in enumerate(out.new_token_ids):
            self.produced += 1
            pieces.append((self.decoder.push(token), None if out.logprobs is None
                           else self.texts.entry(out.logprobs[k])))
        piece = "".join(p for p, _ in pieces)
        entries = None if self.params.logprobs is None else tuple(e for _, e in pieces)
        if self.request.stop and self.produced >= self.params.min_tokens:
            cut = cut_at_stop(self.text + piece, self.request.stop, len(self.text))
            if cut is not None:
                kept = piece[: max(0, cut - len(self.text))]
                if entries is not None:  # the tokens whose text starts before the cut
                    starts = [sum(len(p) for p, _ in pieces[:k]) for k in range(len(pieces))]
                    entries = tuple(e for e, s in zip(entries, starts) if s < max(len(kept), 1))
                self.done = True
                return self._chunk(kept, "stop", out, entries, head)
        self.text += piece
        reason = finish_reason(out.finish_reason) if out.finished else None
        return self._chunk(piece, reason, out, entries, head)

    def _head(self, out: RequestOutput) -> dict:
        """What the first chunk carries besides its text: the echoed prompt and its scores."""
        head = {}
        if self.request.echo:
            head["prompt_text"] = (self.request.prompt if self.request.prompt is not None
                                   else self.texts.tokenizer.decode(self.prompt_ids,
                                                                    skip_special_tokens=False))
        if out.prompt_logprobs is not None:
            head["prompt_logprobs"] = self.texts.prompt_entries(self.prompt_ids,
                                                                out.prompt_logprobs)
        return head

    def _chunk(self, text: str, reason: str | None, out: RequestOutput, entries, head: dict,
               produced: int | None = None) -> ShardChunk:
        self.last = ShardChunk(text, reason, len(self.prompt_ids),
                               self.produced if produced is None else produced, self.replica,
                               out.spec_stats, entries, **head)
        return self.last


def joined(a: ShardChunk, b: ShardChunk) -> ShardChunk:
    """``b`` after ``a`` as one chunk: both texts and log-probabilities in order, ``a``'s
    head (the echoed prompt), ``b``'s counts, finish reason and metrics."""
    entries = None if a.logprobs is None and b.logprobs is None else (
        (a.logprobs or ()) + (b.logprobs or ()))
    return replace(b, text=a.text + b.text, logprobs=entries, prompt_text=a.prompt_text,
                   prompt_logprobs=a.prompt_logprobs)


class Gather:
    """A request's chunks gathered until ``interval`` tokens wait (0: until its last
    chunk); its first chunk and its last go at once. Fewer, larger chunks cost the path to
    the client (Ray's streams, the ingress, the proxy) less per token."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.waiting: ShardChunk | None = None
        self.sent: int | None = None  # completion tokens when the last chunk was sent

    def add(self, chunk: ShardChunk) -> ShardChunk | None:
        """The chunk to send now (``chunk`` joined to what waited), or None to wait. The
        last chunk is the one with a finish reason."""
        if self.waiting is not None:
            chunk = joined(self.waiting, chunk)
        due = (self.sent is None or chunk.finish_reason is not None
               or (self.interval > 0
                   and chunk.completion_tokens - self.sent >= self.interval))
        if not due:
            self.waiting = chunk
            return None
        self.waiting, self.sent = None, chunk.completion_tokens
        return chunk
