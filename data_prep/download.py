"""``python -m data_prep.download``: fetch the official CaloChallenge files from Zenodo, resumably and verified.

The Zenodo REST API (``GET /api/records/<id>``) gives each file's name, size, md5 and download link. Each file
is written to ``.<name>.part`` beside its target with a progress bar; an interrupted download continues from
where it stopped with an HTTP range request (also on the next run of the same command); the md5 is checked; the
file then takes its name by a hard link, which never replaces an existing file; and finally it goes through the
streamed CaloChallenge checker. A file already at the target is kept if its md5 matches the record and refused
otherwise: nothing a user put there is overwritten.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import hashlib
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests
from tqdm import tqdm

from hpc_calo.errors import UserError, run_cli

ZENODO_RECORDS = "https://zenodo.org/api/records/"
DATA_ENV = "HPC_CALO_DATA"
# Network reads: a read cut short by a dropped connection loses what it had buffered, so keep them small.
_CHUNK = 1 << 16
_TIMEOUT = (30, 120)  # seconds to connect, and between two reads


@dataclass(frozen=True)
class Official:
    record: str  # Zenodo record of the data set
    samples: str  # record of the CaloChallenge submissions: the published samples of every model
    train: tuple[str, ...]
    reference: tuple[str, ...]  # the held-out file the pipeline evaluates against (the evaluator takes one)
    other: tuple[str, ...] = ()

    def files(self, which: str) -> tuple[str, ...]:
        return {"train": self.train, "reference": self.reference,
                "all": self.train + self.reference + self.other}[which]


# Records of the version DOIs behind 10.5281/zenodo.6366270 (DS2) and 10.5281/zenodo.6366323 (DS3); the samples
# records are those of 10.5281/zenodo.15962050 and 10.5281/zenodo.15962527.
OFFICIAL = {
    "ds2": Official("6366271", "15962050", ("dataset_2_1.hdf5",), ("dataset_2_2.hdf5",)),
    "ds3": Official("6366324", "15962527", ("dataset_3_1.hdf5", "dataset_3_2.hdf5"), ("dataset_3_3.hdf5",),
                    ("dataset_3_4.hdf5",)),
}


def default_data_dir() -> tuple[Path, str]:
    """Where the official files live unless told otherwise, and why: ``$HPC_CALO_DATA``, else ``./data``."""
    env = os.environ.get(DATA_ENV)
    return (Path(env), f"${DATA_ENV}") if env else (Path("data"), "default")


def download_command(dataset: str, out: Path, which: str) -> str:
    files = "" if which == "all" else f" --files {which}"
    return f"python -m data_prep.download --dataset {dataset} --out {out}{files}"


@dataclass(frozen=True)
class RemoteFile:
    key: str
    size: int
    md5: str
    url: str


@dataclass(frozen=True)
class DownloadRequest:
    dataset: str
    out: Path
    files: str  # train | reference | all (the data set's record)
    samples: bool
    record_url: str
    only: str | None
    list_only: bool
    retries: int


def _reason(err: Exception) -> str:
    # requests nests the cause in a long repr; the OS's words ("Connection refused") are what a user needs.
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    return found.group(1) if found else text.rsplit(": ", 1)[-1].strip(" )'\"") or type(err).__name__


def fetch_record(session: requests.Session, url: str) -> list[RemoteFile]:
    try:
        r = session.get(url, timeout=_TIMEOUT)
    except (requests.ConnectionError, requests.Timeout) as err:
        raise UserError(f"cannot reach {url} ({_reason(err)}): no network, or the server is down") from None
    if r.status_code != 200:
        raise UserError(f"{url}: HTTP {r.status_code} {r.reason}")
    try:
        files: list[dict[str, Any]] = r.json()["files"]
        out = []
        for f in files:
            algo, _, digest = f["checksum"].partition(":")
            if algo != "md5":
                raise UserError(f"{url}: {f['key']} has a {algo} checksum; only md5 is supported")
            link = f["links"].get("content") or f["links"]["self"]
            out.append(RemoteFile(f["key"], int(f["size"]), digest, urljoin(url, link)))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{url} is not a Zenodo record (no files[].key/size/checksum/links: {err})") from None
    return out


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        while block := f.read(128 * _CHUNK):
            h.update(block)
    return h.hexdigest()


def _part(out: Path, f: RemoteFile) -> Path:
    # A fixed name, not a per-process one: the next run finds it and resumes.
    return out / f".{f.key}.part"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _pull(session: requests.Session, f: RemoteFile, part: Path, retries: int) -> None:
    """Bring ``part`` to the record's size and md5, resuming from what it holds."""
    with part.open("a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{part}: another download of {f.key} is running") from None
        have = fh.seek(0, os.SEEK_END)
        if have > f.size:
            fh.truncate(0)
            have = 0
        md5 = hashlib.md5()
        fh.seek(0)
        while block := fh.read(128 * _CHUNK):
            md5.update(block)
        if have:
            print(f"{f.key}: resuming at {_gb(have)} of {_gb(f.size)}", flush=True)
        attempt = 0
        with tqdm(total=f.size, initial=have, desc=f.key, unit="B", unit_scale=True, unit_divisor=1024) as bar:
            while have < f.size:
                try:
                    headers = {"Range": f"bytes={have}-"} if have else {}
                    with session.get(f.url, headers=headers, stream=True, timeout=_TIMEOUT) as r:
                        if r.status_code == 200 and have:  # the server ignores ranges: start again
                            fh.truncate(0)
                            have, md5 = 0, hashlib.md5()
                            bar.reset()
                        elif r.status_code == 206:
                            start = r.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                            if start != str(have):
                                raise UserError(f"{f.url}: asked for bytes from {have}, got Content-Range "
                                                f"{r.headers.get('Content-Range')!r}")
                        elif r.status_code != 200:
                            raise UserError(f"{f.url}: HTTP {r.status_code} {r.reason}")
                        for chunk in r.iter_content(_CHUNK):
                            fh.write(chunk)
                            md5.update(chunk)
                            have += len(chunk)
                            bar.update(len(chunk))
                        if have > f.size:
                            raise UserError(f"{f.url} sent {have} bytes; the record says {f.size}")
                        if have < f.size:
                            raise requests.ConnectionError("the server closed the connection early")
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                    fh.flush()
                    if attempt >= retries:
                        raise UserError(
                            f"download of {f.key} from {f.url} stopped at {have} of {f.size} bytes "
                            f"({_reason(err)}); {part} is kept: run the same command again to resume") from None
                    attempt += 1
                    bar.write(f"{f.key}: connection lost at {have} bytes ({_reason(err)}); resuming "
                              f"(retry {attempt} of {retries})")
                    time.sleep(min(2 ** (attempt - 1), 30))
        fh.flush()
        os.fsync(fh.fileno())
    if md5.hexdigest() != f.md5:
        part.unlink()
        raise UserError(f"{f.key}: md5 of the download is {md5.hexdigest()}, the record says {f.md5}: the file "
                        "is refused, and the bad copy deleted so that the next run downloads it afresh")


def _install(part: Path, target: Path) -> None:
    try:
        os.link(part, target)  # atomic, and fails rather than replace a file that appeared meanwhile
    except FileExistsError:
        raise UserError(f"{target} appeared during the download; it is not replaced ({part} is kept)") from None
    except OSError:
        # A filesystem without hard links: a rename, after checking again that nothing is in the way.
        if target.exists():
            raise UserError(f"{target} appeared during the download; it is not replaced ({part} is kept)") from None
        os.replace(part, target)
        return
    part.unlink()


def download(req: DownloadRequest) -> list[Path]:
    """Download the requested files of the record into ``req.out``; return their paths (all verified)."""
    from hpc_calo.geometry import get_geometry
    from hpc_calo.io import check_file

    session = requests.Session()
    session.headers["User-Agent"] = "hpc-calo data_prep.download"
    remote = fetch_record(session, req.record_url)
    if req.list_only:
        for f in remote:
            print(f"{f.key:40} {_gb(f.size):>12}  md5:{f.md5}")
        return []
    by_key = {f.key: f for f in remote}
    wanted = list(by_key) if req.samples else list(OFFICIAL[req.dataset].files(req.files))
    if req.only:
        wanted = [k for k in wanted if fnmatch.fnmatch(k, req.only)]
        if not wanted:
            raise UserError(f"no file of {req.record_url} matches --only {req.only!r}")
    missing = [k for k in wanted if k not in by_key]
    if missing:
        raise UserError(f"{req.record_url} has no {', '.join(missing)} (it has: {', '.join(by_key) or 'no files'})")

    req.out.mkdir(parents=True, exist_ok=True)
    todo = []
    for key in wanted:
        f, target = by_key[key], req.out / key
        if target.exists():
            if target.stat().st_size != f.size or _md5(target) != f.md5:
                raise UserError(f"{target} exists but is not the record's file (size or md5 differ); it is not "
                                "overwritten: move it away and run again")
            print(f"{target}: already there, md5 verified", flush=True)
        else:
            todo.append(f)
    need = sum(f.size - min(f.size, _part(req.out, f).stat().st_size if _part(req.out, f).exists() else 0)
               for f in todo)
    free = shutil.disk_usage(req.out).free
    if need > free:
        raise UserError(f"{req.out}: the download needs {_gb(need)} but only {_gb(free)} is free")

    geometry = get_geometry(req.dataset)
    for f in todo:
        part, target = _part(req.out, f), req.out / f.key
        _pull(session, f, part, req.retries)
        _install(part, target)
        print(f"{target}: downloaded, md5 verified", flush=True)
        if target.suffix in (".hdf5", ".h5"):
            print(check_file(target, geometry).line(), flush=True)
    return [req.out / k for k in wanted]


def build_parser() -> argparse.ArgumentParser:
    out_dir, _ = default_data_dir()
    p = argparse.ArgumentParser(
        prog="python -m data_prep.download",
        description=(
            "Download the official CaloChallenge files of a data set from Zenodo: progress bar, resume of an "
            "interrupted download (HTTP range requests; just run the command again), md5 check, atomic install, "
            "then the streamed CaloChallenge check of each file. DS2: dataset_2_1.hdf5 (train), dataset_2_2.hdf5 "
            "(reference). DS3: dataset_3_1/3_2.hdf5 (train), dataset_3_3.hdf5 (reference; the pipeline evaluates "
            "against this one), dataset_3_4.hdf5 (a second held-out file, with --files all)."
        ),
    )
    p.add_argument("--dataset", choices=tuple(OFFICIAL), required=True, help="CaloChallenge data set")
    p.add_argument("--out", type=Path, default=out_dir,
                   help=f"folder to download into (default: ${DATA_ENV} if set, else ./data; now {out_dir})")
    p.add_argument("--files", choices=("train", "reference", "all"), default="all",
                   help="which of the data set's files: the training ones, the reference, or every file "
                        "(default: all)")
    p.add_argument("--samples", action="store_true",
                   help="instead: the CaloChallenge submissions record of the data set (every model's published "
                        "samples, to evaluate with the same evaluator); pick files with --only, see them with --list")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--record", metavar="ID", help="another Zenodo record id (default: the official one)")
    src.add_argument("--url", help="the record's full API address, e.g. a mirror's https://HOST/api/records/ID")
    p.add_argument("--only", metavar="GLOB", help="only the files whose name matches, e.g. '*iCaloFlow*'")
    p.add_argument("--list", action="store_true", help="list the record's files (name, size, md5) and stop")
    p.add_argument("--retries", type=int, default=5,
                   help="times a dropped connection is resumed before giving up (default 5); the partial file "
                        "is kept either way")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    official = OFFICIAL[args.dataset]
    url = args.url or ZENODO_RECORDS + (args.record or (official.samples if args.samples else official.record))
    if args.retries < 0:
        raise UserError("--retries must be 0 or more")
    req = DownloadRequest(dataset=args.dataset, out=args.out, files=args.files, samples=args.samples,
                          record_url=url, only=args.only, list_only=args.list, retries=args.retries)
    paths = download(req)
    if paths and not args.samples:
        print(f"next: python -m launch.submit --cluster slurm --dataset {args.dataset} --data-dir {args.out}",
              file=sys.stdout)
    return 0


if __name__ == "__main__":
    run_cli(main)
