"""The loopback HTTPS origin used by tests and the demo: TLS from its own CA, Range, records."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from companion_runtime.bind.https_origin import ModelOrigin

BODY = bytes(range(256)) * 40


def client(origin: ModelOrigin) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=str(origin.ca_pem_path)))


@pytest.mark.integration
def test_serves_bytes_over_tls_with_its_own_ca() -> None:
    with ModelOrigin({"/m.bin": BODY}) as origin:
        assert origin.base_url.startswith("https://127.0.0.1:")
        with client(origin) as http:
            response = http.get(origin.url("/m.bin") + "?q=1")
            assert response.status_code == 200 and response.content == BODY
            assert http.head(origin.url("/m.bin")).headers["content-length"] == str(len(BODY))
            assert http.get(origin.url("/other.bin")).status_code == 404
        with httpx.Client() as untrusting, pytest.raises(httpx.ConnectError):
            untrusting.get(origin.url("/m.bin"))
        first = origin.requests[0]
        assert (first.method, first.path, first.has_query, first.status) == (
            "GET",
            "/m.bin",
            True,
            200,
        )
        assert first.bytes_sent == len(BODY)
        ca = origin.ca_pem_path
        assert ca.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert not ca.exists()


@pytest.mark.integration
def test_range_requests() -> None:
    with ModelOrigin({"/m.bin": BODY}) as origin, client(origin) as http:
        tail = http.get(origin.url("/m.bin"), headers={"Range": "bytes=100-"})
        assert tail.status_code == 206 and tail.content == BODY[100:]
        assert tail.headers["content-range"] == f"bytes 100-{len(BODY) - 1}/{len(BODY)}"
        middle = http.get(origin.url("/m.bin"), headers={"Range": "bytes=10-19"})
        assert middle.content == BODY[10:20]
        past = http.get(origin.url("/m.bin"), headers={"Range": f"bytes={len(BODY)}-"})
        assert past.status_code == 416
        assert [r.range_header for r in origin.requests] == [
            "bytes=100-",
            "bytes=10-19",
            f"bytes={len(BODY)}-",
        ]
        assert origin.requests[0].bytes_sent == len(BODY) - 100


@pytest.mark.integration
@pytest.mark.security
def test_directory_serving_stays_inside_the_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    (root / "models" / "a.bin").write_bytes(b"inside")
    (tmp_path / "secret.txt").write_bytes(b"outside")
    with ModelOrigin(directory=root) as origin:
        assert origin.body_for("/models/a.bin") == b"inside"
        assert origin.body_for("/../secret.txt") is None
        assert origin.body_for("/models") is None
        with client(origin) as http:
            assert http.get(origin.url("/models/a.bin")).content == b"inside"
