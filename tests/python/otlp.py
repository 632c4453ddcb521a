"""An OTLP/gRPC trace receiver for tests: it implements the collector's TraceService
(opentelemetry.proto.collector.trace.v1) and keeps every span it is sent."""

import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

SPAN_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Span:
    """One received span, with hex ids and plain attribute values."""

    def __init__(self, service, span):
        self.service = service
        self.name = span.name
        self.kind = SPAN_KINDS.get(span.kind, "UNSPECIFIED")
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()
        self.parent_span_id = span.parent_span_id.hex()
        self.attributes = {a.key: _value(a.value) for a in span.attributes}
        self.links = [(l.trace_id.hex(), l.span_id.hex()) for l in span.links]
        self.events = [e.name for e in span.events]
        self.status_code = span.status.code  # 0 unset, 1 ok, 2 error
        self.seconds = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9

    def __repr__(self):
        return (f"Span({self.service}: {self.name} {self.kind} {self.span_id}"
                f" parent={self.parent_span_id or '-'})")


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver):
        self.receiver = receiver

    def Export(self, request, context):
        spans = []
        for rs in request.resource_spans:
            attrs = {a.key: _value(a.value) for a in rs.resource.attributes}
            service = attrs.get("service.name", "")
            for ss in rs.scope_spans:
                spans.extend(Span(service, s) for s in ss.spans)
        with self.receiver.lock:
            self.receiver.spans.extend(spans)
            self.receiver.resources.append(attrs)
        return trace_service_pb2.ExportTraceServiceResponse()


class Receiver:
    """Listens on a loopback port until stopped; `spans` holds what arrived."""

    def __init__(self, port=0):
        self.lock = threading.Lock()
        self.spans = []
        self.resources = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(self), self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def trace(self, trace_id):
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def stop(self):
        self.server.stop(grace=None).wait()
