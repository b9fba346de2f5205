"""Finished spans written straight in OTLP's protobuf wire format, and the exporter that
posts them.

A replica traces one ``engine_step`` event per step of every traced request. The SDK's OTLP
encoder builds a protobuf object per attribute in Python (about 60 µs for a step's event
here: ``python -m dspark.bench.otel_event_cost``), on the exporter's thread, which holds
the replica's GIL. Here spans are written as bytes from cached key prefixes and framed
attribute pairs, and a :class:`PackedEvent` (the replica's step events) writes its own
bytes without ever building an attribute dict for the SDK: the same OTLP message (the
tests compare it with the SDK encoder's), still posted by the SDK's exporter (endpoint,
headers, compression, retries).

Wire format (opentelemetry/proto/trace/v1/trace.proto, common/v1/common.proto), as used
here: ``Span`` = trace_id (1), span_id (2), trace_state (3), parent_span_id (4), name (5),
kind (6), start and end (7, 8, fixed64), attributes (9), dropped counts (10, 12), events
(11), status (15), flags (16, fixed32); ``Event`` = time_unix_nano (1, fixed64), name (2),
attributes (3); ``KeyValue`` = key (1), value (2, ``AnyValue``); ``AnyValue`` =
string_value (1), bool_value (2), int_value (3, varint), double_value (4, fixed64),
array_value (5), bytes_value (7). A batch with links (or a value the SDK itself would
write oddly: None, a map) goes to the SDK's encoder whole.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping

from opentelemetry.sdk.trace import EventBase

_log = logging.getLogger(__name__)

_SMALL = tuple(bytes([n]) for n in range(128))


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of ``n`` (a negative int64 as its two's complement)."""
    if 0 <= n < 128:
        return _SMALL[n]
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte, the length, the bytes."""
    return bytes([tag]) + varint(len(payload)) + payload


class _Unsupported(Exception):
    """A span this encoder leaves to the SDK's (links, map or None values)."""


_KEYS: dict[str, bytes] = {}
_NAMES: dict[str, bytes] = {}


def _framed(cache: dict[str, bytes], tag: int, text: str, limit: int) -> bytes:
    """``text`` as a framed field ``tag``, kept in ``cache`` (up to ``limit`` entries):
    attribute keys and event names repeat."""
    framed = cache.get(text)
    if framed is None:
        framed = _field(tag, text.encode())
        if len(cache) < limit:
            cache[text] = framed
    return framed


def _key(key: str) -> bytes:
    """``KeyValue.key`` (field 1), framed."""
    return _framed(_KEYS, 0x0A, key, 4096)


def _any_value(value) -> bytes:
    if value is True or value is False:
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    if isinstance(value, str):
        return _field(0x0A, value.encode())
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if value is None or isinstance(value, Mapping):
        raise _Unsupported
    # a sequence: ArrayValue (5) of AnyValue (1)
    return _field(0x2A, b"".join(_field(0x0A, _any_value(v)) for v in value))


_PAIRS: dict[tuple, bytes] = {}
"""Framed ``attributes`` entries by (key, value), for the values that repeat (small ints,
short strings): most of a step event is a dict lookup."""
_MAX_PAIRS = 1 << 16


def pair(key: str, value) -> bytes:
    """One framed ``attributes`` entry (field 3 of ``Event``)."""
    cacheable = type(value) is bool or (type(value) is int and -1 <= value < 4096) or (
        type(value) is str and len(value) <= 16)
    # NOTE: the type is part of the key: True == 1 and hash alike, but encode apart
    slot = (key, type(value), value)
    if cacheable:
        framed = _PAIRS.get(slot)
        if framed is not None:
            return framed
    framed = _field(0x1A, _key(key) + _field(0x12, _any_value(value)))
    if cacheable and len(_PAIRS) < _MAX_PAIRS:
        _PAIRS[slot] = framed
    return framed


def int_pair(key: str, value: int) -> bytes:
    """``pair(key, value)`` for an int that need not repeat (a step's number): its key's
    bytes cached, the value written straight."""
    if -1 <= value < 4096:
        return pair(key, value)
    head = _INT_HEADS.get(key)
    if head is None:
        head = _INT_HEADS[key] = _key(key)
    number = varint(value)
    any_value = b"\x12" + _SMALL[len(number) + 1] + b"\x18" + number  # NOTE: < 128 bytes
    body = head + any_value
    return b"\x1a" + varint(len(body)) + body


_INT_HEADS: dict[str, bytes] = {}


def encode_event(name: str, timestamp: int, attributes: Mapping | None,
                 dropped: int = 0) -> bytes:
    """The bytes of one ``Span.events`` entry (field 11, framed)."""
    return encode_fields(timestamp, name, b"".join(
        [pair(k, v) for k, v in (attributes or {}).items()]), dropped)


def encode_fields(timestamp: int, name: str, attributes: bytes, dropped: int = 0) -> bytes:
    """One framed ``Span.events`` entry from its time, its name and its attributes' bytes
    (framed ``pair``s)."""
    body = b"".join([b"\x09", struct.pack("<Q", timestamp), _framed(_NAMES, 0x12, name, 256),
                     attributes])
    if dropped:
        body += b"\x20" + varint(dropped)
    return b"\x5a" + varint(len(body)) + body


class PackedEvent(EventBase):
    """A span event that writes its own OTLP bytes (:meth:`encode`); ``attributes`` are
    built only when something else reads them (another exporter, a test)."""

    def encode(self) -> bytes:
        return encode_event(self.name, self.timestamp, self.attributes)

    @property
    def dropped_attributes(self) -> int:
        return 0


def _post(exporter) -> object | None:
    """The SDK exporter's poster of encoded requests, where this SDK version has one."""
    client = getattr(exporter, "_client", None)
    return client if callable(getattr(client, "export", None)) else None


def _encode_any(event) -> bytes:
    if isinstance(event, PackedEvent):
        return event.encode()
    return encode_event(event.name, event.timestamp, event.attributes,
                        getattr(event, "dropped_attributes", 0))


def _attributes(tag: int, attributes: Mapping | None) -> bytes:
    """Repeated ``KeyValue`` field ``tag`` (1 for a resource, 3 for a scope, 9 for a span)."""
    if not attributes:
        return b""
    pairs = [pair(k, v) for k, v in attributes.items()]
    return b"".join(pairs) if tag == 3 else b"".join(
        bytes([(tag << 3) | 2]) + p[1:] for p in pairs)


_KIND = {0: 1, 1: 2, 2: 3, 3: 4, 4: 5}
"""SDK ``SpanKind`` value -> OTLP ``Span.SpanKind`` (INTERNAL, SERVER, CLIENT, PRODUCER,
CONSUMER)."""


def encode_span(span) -> bytes:
    """One ``Span`` message (unframed)."""
    if span.links:
        raise _Unsupported
    ctx, parent = span.get_span_context(), span.parent
    out = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"), b"\x12\x08",
           ctx.span_id.to_bytes(8, "big")]
    if ctx.trace_state:
        out.append(_field(0x1A, ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
                          .encode()))
    if parent is not None:
        out += [b"\x22\x08", parent.span_id.to_bytes(8, "big")]
    out += [_field(0x2A, span.name.encode()), b"\x30", varint(_KIND[span.kind.value]),
            b"\x39", struct.pack("<Q", span.start_time), b"\x41", struct.pack("<Q", span.end_time),
            _attributes(9, span.attributes)]
    out += [_encode_any(event) for event in span.events]
    for tag, count in ((0x50, span.dropped_attributes), (0x60, span.dropped_events)):
        if count:
            out += [bytes([tag]), varint(count)]
    status = span.status
    body = b""
    if status.description:
        body += _field(0x12, status.description.encode())
    if status.status_code.value:
        body += b"\x18" + varint(status.status_code.value)
    flags = 0x100 | (0x200 if parent is not None and parent.is_remote else 0)
    out += [_field(0x7A, body), b"\x85\x01", struct.pack("<I", flags)]
    return b"".join(out)


def _scope(scope) -> bytes:
    if scope is None:
        return b""
    out = _field(0x0A, scope.name.encode()) if scope.name else b""
    if scope.version:
        out += _field(0x12, scope.version.encode())
    return out + _attributes(3, scope.attributes)


def encode_request(spans) -> bytes:
    """The ``ExportTraceServiceRequest`` of ``spans``, the message the SDK's encoder makes
    (which encodes a batch this one does not cover: links, map or None values)."""
    groups: dict = {}
    try:
        for span in spans:
            scopes = groups.setdefault(span.resource, {})
            scopes.setdefault(span.instrumentation_scope or None, []).append(encode_span(span))
    except _Unsupported:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        return encode_spans(spans).SerializePartialToString()
    out = []
    for resource, scopes in groups.items():
        body = [_field(0x0A, _attributes(1, resource.attributes))]
        for scope, encoded in scopes.items():
            inner = [_field(0x0A, _scope(scope))] + [_field(0x12, e) for e in encoded]
            if scope is not None and scope.schema_url:
                inner.append(_field(0x1A, scope.schema_url.encode()))
            body.append(_field(0x12, b"".join(inner)))
        if resource.schema_url:
            body.append(_field(0x1A, resource.schema_url.encode()))
        out.append(_field(0x0A, b"".join(body)))
    return b"".join(out)


def packed_exporter(endpoint: str):
    """An OTLP/HTTP span exporter to ``endpoint`` that encodes with ``encode_request``
    (where this SDK's exporter has no separate poster, it falls back to the SDK's whole
    ``export``: the same message, encoded more slowly)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    class PackedEventExporter(OTLPSpanExporter):
        def export(self, spans):
            client = _post(self)
            if client is None or getattr(self, "_shutdown", False):
                return super().export(spans)  # NOTE: this SDK posts otherwise; same OTLP
            try:
                data = encode_request(spans)
            except Exception as error:  # noqa: BLE001 - a bad batch must not stop exports
                _log.error("Failed to encode span batch: %s", error)
                return SpanExportResult.FAILURE
            ok = getattr(client.export(data), "success", False)
            return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    return PackedEventExporter(endpoint=endpoint)
