"""The service's durability and operation: SIGKILL in the middle of enrolments (20 restarts), graceful
SIGTERM, and the API key. Real server subprocesses (MobileFaceNet, to keep the restarts short)."""
from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from serve_harness import require_serve_extra  # noqa: E402

httpx = require_serve_extra()

from conftest import need  # noqa: E402
from runtime.gallery import Gallery  # noqa: E402
from serve_harness import MOBILEFACENET, Server, small_jpeg  # noqa: E402

PORTRAITS = ("obama.jpg", "biden.jpg", "angelina_jolie.jpg", "kate_siegel.jpg", "paul_rudd.jpg")
KEY = "k3y-for-tests-0123456789abcdef"
SEEDED_PEOPLE = 4000  # a gallery of this many people takes long enough to save for some kills to land inside


@pytest.fixture(scope="module")
def faces(facekit_data) -> list[bytes]:
    return [small_jpeg(need(facekit_data / "photos" / name), side=160) for name in PORTRAITS]


def seed_gallery(path, dim: int = 128) -> Gallery:
    rng = np.random.default_rng(5)
    g = Gallery()
    vectors = rng.standard_normal((SEEDED_PEOPLE, dim)).astype(np.float32)
    for i, v in enumerate(vectors):
        g.enroll(f"seed{i:05d}", v)
    g.save(path)
    return g


def enrol_until_refused(url: str, faces: list[bytes], prefix: str, acknowledged: list[str],
                        errors: list[str]) -> None:
    """PUT new people one after another until the server goes away; record each 200 (and any other answer)."""
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(10_000):
            name = f"{prefix}-{i}"
            try:
                r = c.put(f"/v1/galleries/kill/people/{name}", files={"image": ("f.jpg", faces[i % len(faces)])})
            except httpx.TransportError:
                return
            if r.status_code != 200:
                errors.append(f"{name}: {r.status_code} {r.text}")
                return
            acknowledged.append(name)


def inflight(url: str) -> float:
    """Requests the server is handling, not counting this /metrics request."""
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("facekit_inflight_requests "):
            return float(line.split()[1]) - 1
    raise AssertionError("no facekit_inflight_requests in /metrics")


@pytest.mark.slow
def test_sigkill_during_enrolments_20_times_loses_no_acknowledged_change(tmp_path, faces):
    folder = tmp_path / "galleries"
    folder.mkdir()
    path = folder / "kill.npz"
    seed_gallery(path)
    rng = random.Random(20)
    acknowledged: list[str] = []
    errors: list[str] = []
    mid_save = 0
    t0 = time.monotonic()
    for round_ in range(20):
        srv = Server(folder, tmp_path / "server.log", "--recognizer", MOBILEFACENET)
        try:
            srv.start()
            threads = [threading.Thread(target=enrol_until_refused,
                                        args=(srv.url, faces, f"r{round_}w{w}", acknowledged, errors))
                       for w in range(2)]
            for t in threads:
                t.start()
            wanted, before = len(acknowledged) + rng.randint(1, 3), time.monotonic()
            while len(acknowledged) < wanted and not errors and time.monotonic() - before < 60:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.2))  # then strike at a random point of the next enrolments
            srv.kill()
            for t in threads:
                t.join(60)
        finally:
            srv.kill()
        mid_save += any(p.name.startswith(f".kill.npz.{srv.proc.pid}.") for p in folder.iterdir())
        assert not errors, errors
        g = Gallery.load(path)  # always loads
        missing = set(acknowledged) - set(g.names)
        assert not missing, f"round {round_}: acknowledged but lost: {sorted(missing)}"
        assert len(g) >= SEEDED_PEOPLE
    print(f"\n20 SIGKILLs in {time.monotonic() - t0:.1f} s; {len(acknowledged)} acknowledged enrolments all kept; "
          f"{mid_save} kills struck during a save")
    assert len(acknowledged) >= 20


def test_the_api_key_is_required_on_v1_and_metrics(tmp_path, faces):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# facekit keys\n{KEY}\n")
    srv = Server(tmp_path / "galleries", tmp_path / "server.log", "--recognizer", MOBILEFACENET,
                 "--api-key-file", str(key_file))
    try:
        srv.start()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for headers in ({}, {"x-api-key": "wrong"}, {"authorization": f"Basic {KEY}"},
                            {"authorization": f"Bearer {KEY}x"}):
                for method, path in (("GET", "/v1/galleries"), ("POST", "/v1/detect"), ("GET", "/metrics")):
                    r = c.request(method, path, headers=headers, content=faces[0])
                    assert r.status_code == 401, (headers, path)
                    assert r.json()["error"]["code"] == "unauthorized"
                    assert r.headers["www-authenticate"] == "Bearer"
            assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
            assert c.get("/v1/galleries", headers={"x-api-key": KEY}).json()["galleries"] == []
            r = c.post("/v1/detect", headers={"authorization": f"Bearer {KEY}", "content-type": "image/jpeg"},
                       content=faces[0])
            assert r.status_code == 200 and len(r.json()["faces"]) == 1
            metrics = c.get("/metrics", headers={"x-api-key": KEY}).text
            assert 'facekit_errors_total{code="unauthorized"} 12.0' in metrics
            assert 'facekit_requests_total{endpoint="/v1/detect",method="POST",status="401"} 4.0' in metrics
    finally:
        srv.kill()


def test_sigterm_finishes_the_request_in_flight_and_exits_0(tmp_path, faces):
    srv = Server(tmp_path / "galleries", tmp_path / "server.log", "--recognizer", MOBILEFACENET)
    try:
        srv.start()
        result: dict = {}

        def enrol() -> None:
            files = [("image", (f"{i}.jpg", faces[i % len(faces)])) for i in range(12)]
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                result["r"] = c.put("/v1/galleries/term/people/many", files=files)

        t = threading.Thread(target=enrol)
        t.start()
        deadline = time.monotonic() + 30
        while inflight(srv.url) < 1:
            assert time.monotonic() < deadline, "the enrolment never started"
            time.sleep(0.01)
        rc = srv.terminate()
        t.join(60)
    finally:
        srv.kill()
    assert rc == 0, srv.log_text()[-2000:]
    assert result["r"].status_code == 200 and result["r"].json()["added"] == 12
    assert Gallery.load(srv.galleries / "term.npz").names == ["many"]
