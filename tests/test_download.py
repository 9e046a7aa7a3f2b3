"""The Zenodo downloader against a real HTTP server on 127.0.0.1 (range requests, dropped connections), serving
a Zenodo-shaped record and small synthetic CaloChallenge files under the official names."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_prep.download import main as download_main

PY = sys.executable


@dataclass
class FakeZenodo:
    """What the server serves and what it saw."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    md5_override: dict[str, str] = field(default_factory=dict)
    size_override: dict[str, int] = field(default_factory=dict)
    drop_after: dict[str, int] = field(default_factory=dict)  # key -> bytes sent before the first response dies
    ranges: list[str | None] = field(default_factory=list)  # Range header of every file request, in order

    def record(self) -> dict:
        return {"id": 1, "files": [
            {"key": k, "size": self.size_override.get(k, len(b)),
             "checksum": "md5:" + self.md5_override.get(k, hashlib.md5(b).hexdigest()),
             "links": {"self": f"{self.base}/api/records/1/files/{k}/content"}}
            for k, b in self.files.items()]}


def _handler(z: FakeZenodo) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            parts = self.path.strip("/").split("/")
            if parts == ["api", "records", "1"]:
                self._send(200, json.dumps(z.record()).encode(), {"Content-Type": "application/json"})
                return
            if len(parts) != 6 or parts[4] not in z.files:
                self._send(404, b"not found", {})
                return
            key, data = parts[4], z.files[parts[4]]
            rng = self.headers.get("Range")
            z.ranges.append(rng)
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            body = data[start:]
            headers = {"Content-Length": str(len(body)), "Accept-Ranges": "bytes"}
            if rng:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if key in z.drop_after:  # promise the whole body, send part of it, hang up
                cut = z.drop_after.pop(key)
                self.send_response(206 if rng else 200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self._send(206 if rng else 200, body, headers)

    return Handler


@pytest.fixture
def zenodo(synthetic: Callable[..., Path]) -> Iterator[FakeZenodo]:
    z = FakeZenodo(files={
        "dataset_2_1.hdf5": synthetic("ds2", 300, 1).read_bytes(),
        "dataset_2_2.hdf5": synthetic("ds2", 200, 2).read_bytes(),
    })
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(z))
    z.base = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield z
    server.shutdown()
    server.server_close()


def fetch(z: FakeZenodo, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "data_prep.download", "--dataset", "ds2", "--url", f"{z.base}/api/records/1",
                           "--out", str(out), *args], capture_output=True, text=True, timeout=300)


def test_clean_download_verifies_and_checks_every_file(zenodo: FakeZenodo, tmp_path: Path) -> None:
    r = fetch(zenodo, tmp_path / "data")
    assert r.returncode == 0, r.stderr
    for key, data in zenodo.files.items():
        assert (tmp_path / "data" / key).read_bytes() == data
        assert f"{tmp_path / 'data' / key}: downloaded, md5 verified" in r.stdout
    assert "ds2, 300 showers" in r.stdout and "ds2, 200 showers" in r.stdout  # the CaloChallenge check ran
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(zenodo.files)  # no partial left
    # Again: nothing is fetched, the files are recognised by their md5.
    before = len(zenodo.ranges)
    r = fetch(zenodo, tmp_path / "data")
    assert r.returncode == 0, r.stderr
    assert "already there, md5 verified" in r.stdout and len(zenodo.ranges) == before


def test_interrupted_download_resumes_with_a_range_request(zenodo: FakeZenodo, tmp_path: Path) -> None:
    out, key = tmp_path / "data", "dataset_2_1.hdf5"
    cut = len(zenodo.files[key]) // 3
    zenodo.drop_after[key] = cut
    r = fetch(zenodo, out, "--files", "train", "--retries", "0")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: download of {key} from ")
    assert "run the same command again to resume" in r.stderr
    kept = (out / f".{key}.part").stat().st_size
    assert not (out / key).exists() and 0 < kept <= cut
    # The next run asks only for the rest and ends with the same bytes as the server's.
    r = fetch(zenodo, out, "--files", "train")
    assert r.returncode == 0, r.stderr
    assert "resuming at" in r.stdout and zenodo.ranges == [None, f"bytes={kept}-"]
    assert (out / key).read_bytes() == zenodo.files[key]
    assert not (out / f".{key}.part").exists()


def test_dropped_connection_is_resumed_within_one_run(zenodo: FakeZenodo, tmp_path: Path) -> None:
    key = "dataset_2_2.hdf5"
    zenodo.drop_after[key] = 300_000
    assert download_main(["--dataset", "ds2", "--url", f"{zenodo.base}/api/records/1", "--out", str(tmp_path),
                          "--files", "reference"]) == 0
    assert len(zenodo.ranges) == 2 and zenodo.ranges[0] is None
    assert 0 < int(zenodo.ranges[1].removeprefix("bytes=").rstrip("-")) <= 300_000
    assert (tmp_path / key).read_bytes() == zenodo.files[key]


def test_checksum_mismatch_is_refused(zenodo: FakeZenodo, tmp_path: Path) -> None:
    zenodo.md5_override["dataset_2_1.hdf5"] = "0" * 32
    r = fetch(zenodo, tmp_path, "--files", "train")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: dataset_2_1.hdf5: md5 of the download is ") and "refused" in line
    assert not any(tmp_path.iterdir())  # not installed, and the bad copy is not resumed from


def test_user_file_in_the_way_is_never_overwritten(zenodo: FakeZenodo, tmp_path: Path) -> None:
    mine = tmp_path / "dataset_2_2.hdf5"
    mine.write_bytes(b"my own notes")
    r = fetch(zenodo, tmp_path, "--files", "reference")
    assert r.returncode == 2 and "is not overwritten" in r.stderr
    assert mine.read_bytes() == b"my own notes"


def test_missing_file_in_the_record(zenodo: FakeZenodo, tmp_path: Path) -> None:
    del zenodo.files["dataset_2_2.hdf5"]
    r = fetch(zenodo, tmp_path, "--files", "all")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {zenodo.base}/api/records/1 has no dataset_2_2.hdf5 "
                                "(it has: dataset_2_1.hdf5)")
    assert not any(tmp_path.iterdir())


def test_disk_too_small_is_found_before_downloading(zenodo: FakeZenodo, tmp_path: Path) -> None:
    zenodo.size_override["dataset_2_1.hdf5"] = 10**18
    r = fetch(zenodo, tmp_path, "--files", "train")
    assert r.returncode == 2 and "the download needs 1000000000.00 GB but only" in r.stderr
    assert zenodo.ranges == [] and not any(tmp_path.iterdir())


def test_no_network_is_one_line_naming_the_url(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api/records/1"
    r = subprocess.run([PY, "-m", "data_prep.download", "--dataset", "ds3", "--url", url, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: cannot reach {url} (Connection refused): no network, or the server is down"
