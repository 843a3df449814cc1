"""The HTTP service against the in-process pipeline: one real server subprocess for the module, a real
httpx client; every answer is compared with ``FacePipeline`` / ``Gallery`` on the same bytes."""
from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import pytest

from serve_harness import require_serve_extra  # noqa: E402

httpx = require_serve_extra()

from conftest import cosine, need  # noqa: E402
from image_corpus import BAD_INPUTS, corpus_bytes, corrupt_but_well_framed  # noqa: E402
from runtime.gallery import Gallery  # noqa: E402
from runtime.pipeline import FacePipeline  # noqa: E402
from serve_harness import Server, blank_jpeg, small_jpeg  # noqa: E402

PORTRAITS = ("obama.jpg", "obama2.jpg", "biden.jpg", "angelina_jolie.jpg", "kate_siegel.jpg", "paul_rudd.jpg")


@pytest.fixture(scope="module")
def photos(facekit_data) -> dict[str, bytes]:
    out = {name: small_jpeg(need(facekit_data / "photos" / name)) for name in PORTRAITS}
    out["group_t1.jpg"] = small_jpeg(need(facekit_data / "photos" / "group_t1.jpg"), side=640)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("serve")
    srv = Server(folder / "galleries", folder / "server.log")
    try:
        yield srv.start()
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def upload(data: bytes, name: str = "face.jpg", field: str = "image") -> dict:
    return {"files": {field: (name, data, "image/jpeg")}}


def error_of(r) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert "Traceback" not in r.text
    return body["error"]


def assert_same_faces(got: list[dict], want, embeddings: bool = False) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        wd = w.to_dict()
        assert g["box"] == pytest.approx(wd["box"], abs=0.02)
        assert np.allclose(g["landmarks"], wd["landmarks"], atol=0.02)
        assert g["score"] == pytest.approx(wd["score"], abs=1e-3)
        if embeddings:
            assert cosine(g["embedding"], w.embedding) >= 0.99999


# --------------------------------------------------------------------------------------- endpoints


def test_health_readiness_and_schema(client, pipe):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["models"]["recognizer"] == pipe.providers["recognizer"]  # the same default backend
    schema = client.get("/openapi.json").json()
    for path in ("/v1/detect", "/v1/embed", "/v1/compare", "/v1/galleries/{gallery}",
                 "/v1/galleries/{gallery}/people/{name}", "/v1/galleries/{gallery}/identify"):
        assert path in schema["paths"], path
    assert "multipart/form-data" in schema["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    if "/docs/assets/" in docs.text:  # swagger-ui-bundle installed: the page works offline
        script = client.get("/docs/assets/swagger-ui-bundle.js")
        assert script.status_code == 200 and len(script.content) > 100_000


def test_detect_and_embed_equal_the_pipeline(client, pipe, photos):
    for name in ("obama.jpg", "group_t1.jpg"):
        data = photos[name]
        want = pipe.embed(data)
        assert want, name
        r = client.post("/v1/detect", **upload(data, name))
        assert r.status_code == 200, r.text
        assert_same_faces(r.json()["faces"], pipe.detect(data))
        raw = client.post("/v1/embed", content=data, headers={"content-type": "image/jpeg"})
        assert raw.status_code == 200, raw.text
        assert_same_faces(raw.json()["faces"], want, embeddings=True)
    assert len(want) >= 4  # the group photo: several faces embedded in one request


def test_compare_equals_the_pipeline(client, pipe, photos):
    for a, b in (("obama.jpg", "obama2.jpg"), ("obama.jpg", "biden.jpg")):
        want = pipe.compare(photos[a], photos[b])
        r = client.post("/v1/compare", files={"a": (a, photos[a]), "b": (b, photos[b])})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["similarity"] == pytest.approx(want.similarity, abs=1e-5)
        assert got["same"] == want.same and got["threshold"] == pytest.approx(want.threshold)
    assert got["same"] is False and client.post("/v1/compare", files={
        "a": ("a.jpg", photos["obama.jpg"]), "b": ("b.jpg", photos["obama2.jpg"])}).json()["same"] is True


def test_gallery_enrol_identify_list_remove_equal_the_gallery(client, server, pipe, photos):
    people = {"Barack Obama": ["obama.jpg"], "Joe Biden": ["biden.jpg"], "Angelina Jolie": ["angelina_jolie.jpg"],
              "Kate Siegel": ["kate_siegel.jpg"]}
    local = Gallery()
    for person, names in people.items():
        files = [("image", (n, photos[n], "image/jpeg")) for n in names]
        r = client.put(f"/v1/galleries/parity/people/{person}", files=files)
        assert r.status_code == 200, r.text
        assert r.json()["added"] == len(names)
        local.enroll(person, [photos[n] for n in names], pipeline=pipe)
    info = client.get("/v1/galleries/parity").json()
    assert info["people"] == local.names and info["embeddings"] == local.num_embeddings
    assert info["threshold"] == pytest.approx(pipe.threshold)
    on_disk = Gallery.load(server.galleries / "parity.npz")  # durable before the answer
    assert on_disk.names == local.names
    for person in local.names:
        assert cosine(on_disk.embeddings(person)[0], local.embeddings(person)[0]) >= 0.99999

    for query in ("obama2.jpg", "paul_rudd.jpg", "biden.jpg"):
        want = local.identify(photos[query], top_k=3, pipeline=pipe)
        r = client.post("/v1/galleries/parity/identify", params={"top_k": 3}, **upload(photos[query], query))
        assert r.status_code == 200, r.text
        got = r.json()["matches"]
        assert [m["name"] for m in got] == [n for n, _ in want], query
        assert [m["similarity"] for m in got] == pytest.approx([s for _, s in want], abs=1e-5)
    assert got[0]["name"] == "Joe Biden"

    r = client.delete("/v1/galleries/parity/people/Joe Biden")
    assert r.status_code == 200 and r.json()["removed"] == 1
    local.remove("Joe Biden")
    assert Gallery.load(server.galleries / "parity.npz").names == local.names
    got = client.post("/v1/galleries/parity/identify", **upload(photos["biden.jpg"])).json()["matches"]
    assert got[0]["name"] == local.identify(photos["biden.jpg"], pipeline=pipe)[0][0]
    assert error_of(client.delete("/v1/galleries/parity/people/Joe Biden"))["code"] == "person_not_found"
    assert error_of(client.get("/v1/galleries/nobody"))["code"] == "gallery_not_found"
    r = client.put("/v1/galleries/parity/people/Barack Obama", params={"replace": "true"},
                   **upload(photos["obama2.jpg"]))
    assert r.json()["replaced"] is True and r.json()["embeddings"] == 1
    assert client.get("/v1/galleries/parity/people/Barack Obama").json()["embeddings"] == 1


def test_no_face(client):
    blank = blank_jpeg()
    assert client.post("/v1/detect", **upload(blank)).json() == {"faces": []}
    assert client.post("/v1/embed", **upload(blank)).json() == {"faces": []}
    e = error_of(client.post("/v1/compare", files={"a": ("a.jpg", blank), "b": ("b.jpg", blank)}))
    assert e["code"] == "no_face" and "a.jpg" in e["message"]
    r = client.put("/v1/galleries/noface/people/nobody", **upload(blank, "blank.jpg"))
    assert r.status_code == 422 and error_of(r)["code"] == "no_face" and "blank.jpg" in error_of(r)["message"]
    assert client.get("/v1/galleries/noface").status_code == 404  # nothing was created


# ------------------------------------------------------------------------------------------ errors


def test_bad_images_get_422_with_the_runtimes_reason_and_rss_stays_bounded(client, server, photos):
    pytest.importorskip("PIL", reason="Pillow writes the CMYK, animated GIF and EXIF corpus files")
    corpus = corpus_bytes()
    bad = {name: corpus[name] for name in BAD_INPUTS if name in corpus}
    bad["corrupt.png"] = corrupt_but_well_framed()["png"]  # past the header checks: the decoder refuses it
    assert client.put("/v1/galleries/bad/people/obama", **upload(photos["obama.jpg"])).status_code == 200
    rss_before = server.rss_mb()
    for round_ in range(5):
        for name, data in bad.items():
            endpoint = ("/v1/detect", "/v1/embed", "/v1/galleries/bad/identify")[round_ % 3]
            r = client.post(endpoint, **upload(data, name)) if round_ % 2 else \
                client.post(endpoint, content=data, headers={"content-type": "application/octet-stream"})
            assert r.status_code == 422, (name, r.status_code, r.text)
            e = error_of(r)
            assert e["code"] == "invalid_image"
            if name in BAD_INPUTS:
                assert BAD_INPUTS[name] in e["message"].lower(), (name, e)
    rss_after = server.rss_mb()
    print(f"\nserver RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after {5 * len(bad)} bad images")
    assert rss_after - rss_before < 100
    r = client.post("/v1/detect", **upload(photos["obama.jpg"]))  # still serving
    assert r.status_code == 200 and len(r.json()["faces"]) == 1
    assert f'facekit_errors_total{{code="invalid_image"}} {5 * len(bad)}.0' in client.get("/metrics").text


def _raw_http(url: str, head: bytes, chunks=()) -> tuple[int, dict]:
    """Send ``head`` (and ``chunks``) on a plain socket; the status and JSON body of the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as s:
        s.sendall(head)
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            got = s.recv(65536)
            if not got:
                break
            data += got
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def test_upload_limit_is_enforced_before_the_body_is_read(server):
    host = urlsplit(server.url).netloc.encode()
    t0 = time.monotonic()
    status, body = _raw_http(server.url, b"POST /v1/embed HTTP/1.1\r\nHost: " + host + b"\r\n"
                             b"Content-Type: image/jpeg\r\nContent-Length: 1000000000\r\n\r\n")
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert time.monotonic() - t0 < 10  # answered without waiting for a gigabyte
    chunk = b"\xff" * (1 << 20)
    frames = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 11 + [b"0\r\n\r\n"]
    status, body = _raw_http(server.url, b"POST /v1/detect HTTP/1.1\r\nHost: " + host + b"\r\n"
                             b"Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n", frames)
    assert status == 413 and body["error"]["code"] == "payload_too_large"


def test_media_parameters_and_names_are_checked(client, photos):
    face = photos["obama.jpg"]
    assert error_of(client.post("/v1/detect", content=b"{}", headers={"content-type": "application/json"}))[
        "code"] == "unsupported_media_type"
    r = client.post("/v1/detect", files={"image": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type"
    r = client.post("/v1/detect", files=[("image", ("a.jpg", face)), ("image", ("b.jpg", face))])
    assert r.status_code == 422 and error_of(r)["code"] == "too_many_images"
    for params in ({"top_k": "abc"}, {"top_k": 0}, {"top_k": 10_000}):
        r = client.post("/v1/galleries/parity/identify", params=params, **upload(face))
        assert r.status_code == 422 and error_of(r)["code"] == "invalid_parameter", params
    r = client.put("/v1/galleries/parity/people/x", params={"replace": "maybe"}, **upload(face))
    assert r.status_code == 422 and error_of(r)["code"] == "invalid_parameter"
    for path in ("/v1/galleries/a.b", "/v1/galleries/" + "g" * 65, "/v1/galleries/-x/identify"):
        r = client.get(path) if not path.endswith("identify") else client.post(path, **upload(face))
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_name", path
    for person in ("%2E%2E", "a%01b", " padded", "x" * 129, "back\\slash"):
        r = client.put("/v1/galleries/parity/people/" + person, **upload(face))
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_name", person
    assert error_of(client.get("/v1/nothing"))["code"] == "not_found"
    assert error_of(client.delete("/v1/detect"))["code"] == "method_not_allowed"


def test_a_request_over_its_time_budget_gets_503(client, photos):
    for path in ("/v1/embed", "/v1/galleries/parity/identify"):
        r = client.post(path, headers={"x-request-timeout": "0.001"}, **upload(photos["group_t1.jpg"]))
        assert r.status_code == 503 and error_of(r)["code"] == "timeout", r.text
        assert r.headers["retry-after"] == "1"
    r = client.post("/v1/embed", headers={"x-request-timeout": "soon"}, **upload(photos["obama.jpg"]))
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_parameter"
    r = client.post("/v1/embed", headers={"x-request-timeout": "60"}, **upload(photos["obama.jpg"]))
    assert r.status_code == 200 and len(r.json()["faces"]) == 1


# ---------------------------------------------------------------------------------------- under load


def _expected(pipe: FacePipeline, photos: dict[str, bytes], gallery: Gallery) -> dict:
    out = {}
    for name, data in photos.items():
        out[("detect", name)] = pipe.detect(data)
        out[("embed", name)] = pipe.embed(data)
        out[("identify", name)] = gallery.identify(data, top_k=2, pipeline=pipe)
    for a, b in zip(PORTRAITS, PORTRAITS[1:] + PORTRAITS[:1]):
        out[("compare", a, b)] = pipe.compare(photos[a], photos[b]).similarity
    return out


def _check(c, kind: str, names: list[str], photos, want) -> None:
    if kind == "gallery":
        assert c.get("/v1/galleries/load").json()["people"] == ["obama", "biden"]
        return
    if kind == "compare":
        r = c.post("/v1/compare", files={"a": ("a.jpg", photos[names[0]]), "b": ("b.jpg", photos[names[1]])})
        assert r.status_code == 200, r.text
        assert r.json()["similarity"] == pytest.approx(want[("compare", *names)], abs=1e-5)
        return
    path = {"detect": "/v1/detect", "embed": "/v1/embed", "identify": "/v1/galleries/load/identify"}[kind]
    r = c.post(path, params={"top_k": 2} if kind == "identify" else None, **upload(photos[names[0]]))
    assert r.status_code == 200, r.text
    if kind == "identify":
        expected = want[("identify", names[0])]
        assert [m["name"] for m in r.json()["matches"]] == [n for n, _ in expected]
        assert [m["similarity"] for m in r.json()["matches"]] == pytest.approx([s for _, s in expected], abs=1e-5)
    else:
        assert_same_faces(r.json()["faces"], want[(kind, names[0])], embeddings=kind == "embed")


def _batch_histogram(client) -> tuple[float, float]:
    """(recognizer calls, calls with one face) from /metrics."""
    calls = single = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("facekit_recognizer_batch_faces_count"):
            calls = float(line.split()[-1])
        elif line.startswith('facekit_recognizer_batch_faces_bucket{le="1.0"}'):
            single = float(line.split()[-1])
    return calls, single


@pytest.mark.slow
def test_16_clients_times_50_mixed_requests_are_all_right_and_batched(client, server, pipe, photos):
    portraits = {n: photos[n] for n in PORTRAITS}
    local = Gallery()
    for person, name in (("obama", "obama.jpg"), ("biden", "biden.jpg")):
        assert client.put(f"/v1/galleries/load/people/{person}", **upload(photos[name])).status_code == 200
        local.enroll(person, photos[name], pipeline=pipe)
    want = _expected(pipe, portraits, local)
    calls_before, single_before = _batch_histogram(client)
    kinds = ("embed", "identify", "compare", "detect", "gallery")

    def worker(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for j in range(50):
                a = PORTRAITS[(i + j) % len(PORTRAITS)]
                b = PORTRAITS[(i + j + 1) % len(PORTRAITS)]
                _check(c, kinds[(i + j) % len(kinds)], [a, b], portraits, want)
        return 50

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(worker, range(16))) == 800
    calls, single = _batch_histogram(client)
    batched = (calls - calls_before) - (single - single_before)
    print(f"\n800 mixed requests from 16 clients in {time.monotonic() - t0:.1f} s; "
          f"{calls - calls_before:.0f} recognizer calls, {batched:.0f} of them with more than one face")
    assert batched > 0
    metrics = client.get("/metrics").text
    assert 'facekit_requests_total{endpoint="/v1/galleries/{gallery}/identify",method="POST",status="200"}' in metrics
    assert "facekit_request_duration_seconds_bucket" in metrics and "facekit_recognizer_queue_depth" in metrics


def test_the_benchmark_client_and_its_accounting(server, photos):
    from benchmarks import serve as bench

    images = [photos["obama.jpg"], photos["biden.jpg"]]
    part = bench.timed_level("service", bench.embed_caller(server.url, images), 2, 0.3, server_pid=server.proc.pid)
    row = bench.merge([part, part]).to_dict()
    assert row["requests"] == 2 * len(part.latencies_s) >= 12  # at least 3 per client per segment
    assert row["p50_ms"] <= row["p99_ms"] and row["cpu_ms_per_request"] > 0 and row["client_cpu_ms_per_request"] > 0
    rows = [{"mode": m, "concurrency": 16, "throughput_per_s": t, "p50_ms": 100.0, "p99_ms": 250.0,
             "cpu_ms_per_request": cpu, "client_cpu_ms_per_request": client}
            for m, t, cpu, client in (("in-process embed (a)", 10.0, 80.0, None),
                                      ("in-process embed (b)", 12.0, 60.0, None), ("service x", 9.0, 64.0, 2.0))]
    s = bench.summarize(rows, 16)
    assert s["service_vs_batched_reference"] == 0.75 and not s["goal_throughput_met"]  # against the best row
    assert s["service_p99_over_p50"] == 2.5 and s["goal_tail_met"]
    assert s["service_cpu_vs_in_process_cpu"] == 1.1  # (64 + 2) / the cheapest in-process row


def test_a_second_server_on_the_same_folder_is_refused(server, tmp_path):
    other = Server(server.galleries, tmp_path / "second.log")
    try:
        rc = other.spawn().wait(120)
    finally:
        other.kill()
    assert rc == 2
    assert "in use by another facekit server" in other.log_text()
    assert len(other.log_text().strip().splitlines()) == 1  # one line, no traceback
