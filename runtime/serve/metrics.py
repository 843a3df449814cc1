"""Prometheus metrics of one server (its own registry, served as text at ``/metrics``).

* ``facekit_requests_total{endpoint,method,status}`` and ``facekit_request_duration_seconds{endpoint}``
  (histogram); ``endpoint`` is the route template (``/v1/galleries/{gallery}/identify``), so client-chosen
  paths cannot grow the label set;
* ``facekit_errors_total{code}``: error answers by their JSON ``code``;
* ``facekit_recognizer_batch_faces`` (histogram of faces per recognizer call) and
  ``facekit_recognizer_batch_seconds``; ``facekit_recognizer_queue_depth`` (faces waiting);
* ``facekit_inflight_requests``; ``facekit_model_info{model,provider}`` (what really runs each model);
  ``facekit_gallery_people{gallery}`` and ``facekit_gallery_embeddings{gallery}``.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """The metrics above, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        disable_created_metrics()  # no *_created series: they double the output and nobody graphs them
        r = self.registry = CollectorRegistry()
        self.requests = Counter("facekit_requests", "HTTP requests answered", ("endpoint", "method", "status"),
                                registry=r)
        self.latency = Histogram("facekit_request_duration_seconds", "Time to answer a request", ("endpoint",),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("facekit_errors", "Error answers by code", ("code",), registry=r)
        self.batch_faces = Histogram("facekit_recognizer_batch_faces", "Faces per recognizer call",
                                     buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("facekit_recognizer_batch_seconds", "Time of one recognizer call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("facekit_recognizer_queue_depth", "Faces waiting for the recognizer", registry=r)
        self.inflight = Gauge("facekit_inflight_requests", "Requests being handled", registry=r)
        self.model_info = Gauge("facekit_model_info", "Loaded models and what runs them (value 1)",
                                ("model", "provider"), registry=r)
        self.gallery_people = Gauge("facekit_gallery_people", "People enrolled", ("gallery",), registry=r)
        self.gallery_embeddings = Gauge("facekit_gallery_embeddings", "Embeddings enrolled", ("gallery",),
                                        registry=r)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, faces: int, seconds: float) -> None:
        self.batch_faces.observe(faces)
        self.batch_seconds.observe(seconds)

    def set_models(self, providers: dict[str, str]) -> None:
        for model, provider in providers.items():
            self.model_info.labels(model, provider).set(1)

    def set_gallery(self, name: str, people: int | None, embeddings: int | None) -> None:
        """Record a gallery's size; ``None`` forgets the gallery."""
        if people is None:
            for gauge in (self.gallery_people, self.gallery_embeddings):
                try:
                    gauge.remove(name)
                except KeyError:
                    pass
            return
        self.gallery_people.labels(name).set(people)
        self.gallery_embeddings.labels(name).set(embeddings)

    def render(self) -> bytes:
        return generate_latest(self.registry)
