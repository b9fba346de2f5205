"""OTLP span events written straight in protobuf's wire format, and the exporter that
uses them.

A replica traces one ``engine_step`` event per step of every traced request. The SDK's OTLP
encoder builds a protobuf object per attribute in Python (about 60 µs for a step's event
here: ``python -m dspark.bench.otel_event_cost``), on the exporter's thread, which holds
the replica's GIL. A :class:`PackedEvent` writes its own ``Span.Event`` bytes from cached
key prefixes instead, and :class:`PackedEventExporter` merges them into the spans the SDK
encoder made without them: the same OTLP message, and the request is still posted by the
SDK's exporter (endpoint, headers, compression, retries).

Wire format (opentelemetry/proto/trace/v1/trace.proto, common/v1/common.proto):
``Span.events`` = field 11; ``Event`` = time_unix_nano (1, fixed64), name (2),
attributes (3, ``KeyValue``); ``KeyValue`` = key (1), value (2, ``AnyValue``); ``AnyValue``
= string_value (1), bool_value (2), int_value (3, varint), double_value (4, fixed64).
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


_KEYS: dict[str, bytes] = {}


def _key(key: str) -> bytes:
    prefix = _KEYS.get(key)
    if prefix is None:
        prefix = _field(0x0A, key.encode())
        if len(_KEYS) < 4096:
            _KEYS[key] = prefix
    return prefix


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
    # a sequence: ArrayValue (5) of AnyValue (1)
    return _field(0x2A, b"".join(_field(0x0A, _any_value(v)) for v in value))


_PAIRS: dict[tuple, bytes] = {}
"""Framed ``attributes`` entries by (key, value), for the values that repeat (small ints,
short strings): most of a step event is a dict lookup."""
_MAX_PAIRS = 1 << 16


def _pair(key: str, value) -> bytes:
    """One framed ``attributes`` entry (field 3 of ``Event``)."""
    cacheable = type(value) is bool or (type(value) is int and -1 <= value < 4096) or (
        type(value) is str and len(value) <= 16)
    if cacheable:
        pair = _PAIRS.get((key, value))
        if pair is not None:
            return pair
    pair = _field(0x1A, _key(key) + _field(0x12, _any_value(value)))
    if cacheable and len(_PAIRS) < _MAX_PAIRS:
        _PAIRS[(key, value)] = pair
    return pair


def encode_event(name: str, timestamp: int, attributes: Mapping | None,
                 dropped: int = 0) -> bytes:
    """The bytes of one ``Span.events`` entry (field 11, framed)."""
    body = b"".join([b"\x09", struct.pack("<Q", timestamp), _key_like(name)]
                    + [_pair(k, v) for k, v in (attributes or {}).items()])
    if dropped:
        body += b"\x20" + varint(dropped)
    return b"\x5a" + varint(len(body)) + body


_NAMES: dict[str, bytes] = {}


def _key_like(name: str) -> bytes:
    """``Event.name`` (field 2), framed; names repeat."""
    framed = _NAMES.get(name)
    if framed is None:
        framed = _field(0x12, name.encode())
        if len(_NAMES) < 256:
            _NAMES[name] = framed
    return framed


class PackedEvent(EventBase):
    """A span event that writes its own OTLP bytes (:meth:`encode`); ``attributes`` are
    built only when something else reads them (another exporter, a test)."""

    def encode(self) -> bytes:
        return encode_event(self.name, self.timestamp, self.attributes)

    @property
    def dropped_attributes(self) -> int:
        return 0


class _Shell:
    """A finished span as the SDK encoder sees it, without its packed events."""

    def __init__(self, span, events) -> None:
        self._span = span
        self.events = events

    def __getattr__(self, name):
        return getattr(self._span, name)


def _post(exporter) -> object | None:
    """The SDK exporter's poster of encoded requests, where this SDK version has one."""
    client = getattr(exporter, "_client", None)
    return client if callable(getattr(client, "export", None)) else None


def _encode_any(event) -> bytes:
    if isinstance(event, PackedEvent):
        return event.encode()
    return encode_event(event.name, event.timestamp, event.attributes,
                        getattr(event, "dropped_attributes", 0))


def encode_request(spans) -> bytes:
    """The ``ExportTraceServiceRequest`` of ``spans``: the SDK's encoder, except that a span
    with packed events has all its events written here, in their order."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    events: dict[bytes, bytes] = {}
    shells = []
    for span in spans:
        if not any(isinstance(e, PackedEvent) for e in span.events):
            shells.append(span)
            continue
        shells.append(_Shell(span, ()))
        events[span.context.span_id.to_bytes(8, "big")] = b"".join(
            _encode_any(e) for e in span.events)
    request = encode_spans(shells)
    if events:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    extra = events.get(span.span_id)
                    if extra:
                        span.MergeFromString(extra)
    return request.SerializePartialToString()


def packed_exporter(endpoint: str):
    """An OTLP/HTTP span exporter to ``endpoint`` that writes packed events itself."""
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
