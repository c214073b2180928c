"""Fetch the real data and checkpoints and lay them out where the .sh launchers expect them.

    python download.py all                       # everything below (needs internet)
    python download.py mnli amazon               # only the data
    python download.py bert-base-uncased tinybert-4l-312
    python download.py --from-archive ~/MNLI.zip --from-archive ~/unprocessed.tar.gz

Writes
  dataset/MNLI/{train,dev_matched,...}.tsv              (GLUE MNLI.zip)
  dataset/amazon/{books,dvd,electronics,kitchen}/{positive,negative}.review
                                                        (Blitzer et al. unprocessed.tar.gz;
                                                         kitchen_&_housewares -> kitchen)
  pretrained_ckpt/bert-base-uncased/{config.json,vocab.txt,pytorch_model.bin}
  pretrained_ckpt/tinybert-4l-312/{config.json,vocab.txt,pytorch_model.bin}
  <downloads>/CHECKSUMS.json: SHA-256 and size of every fetched file

Downloads resume from a partial ``.part`` file (HTTP Range), show a progress bar, are checked
against the server's announced size and, on later runs, against the recorded SHA-256; archives
are checked for the members the layout needs before anything is unpacked, and every target
folder is written under a temporary name and renamed at the end. ``--from-archive`` does the
same from files obtained elsewhere (a zip/tar of MNLI, the Amazon archive, or a zip/tar/folder
of a checkpoint; the kind is recognised from its contents).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from typing import Dict, List

import utils

SOURCES: Dict[str, dict] = {
    "mnli": {"urls": ["https://dl.fbaipublicfiles.com/glue/data/MNLI.zip"]},
    "amazon": {"urls": ["https://www.cs.jhu.edu/~mdredze/datasets/sentiment/unprocessed.tar.gz"]},
    "bert-base-uncased": {"urls": [f"https://huggingface.co/bert-base-uncased/resolve/main/{f}"
                                   for f in ("config.json", "vocab.txt", "pytorch_model.bin")]},
    "tinybert-4l-312": {"urls": [
        f"https://huggingface.co/huawei-noah/TinyBERT_General_4L_312D/resolve/main/{f}"
        for f in ("config.json", "vocab.txt", "pytorch_model.bin")]},
}
AMAZON_FOLDERS = {"books": "books", "dvd": "dvd", "electronics": "electronics",
                  "kitchen_&_housewares": "kitchen", "kitchen": "kitchen"}
MODEL_FILES = ("config.json", "vocab.txt")
WEIGHT_NAMES = ("pytorch_model.bin", "model.safetensors")


class DownloadError(RuntimeError):
    """A failed or inconsistent download or archive; the message names the file."""


# --------------------------------------------------------------------------------------------
# Transfer
# --------------------------------------------------------------------------------------------
def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Checksums:
    """CHECKSUMS.json in the download folder: what each fetched file must still hash to."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, "CHECKSUMS.json")
        self.entries = utils.read_json(self.path, {}) or {}

    def verify(self, path: str) -> bool:
        """True when ``path`` is known and intact; raises when it is known and corrupt."""
        entry = self.entries.get(os.path.basename(path))
        if entry is None or not os.path.isfile(path):
            return False
        if os.path.getsize(path) != entry["size"] or sha256_of(path) != entry["sha256"]:
            raise DownloadError(f"{path}: does not match its recorded SHA-256/size in "
                                f"{self.path}; delete it to fetch it again")
        return True

    def record(self, path: str):
        self.entries[os.path.basename(path)] = {"size": os.path.getsize(path),
                                                "sha256": sha256_of(path)}
        utils.atomic_write_json(self.path, self.entries)


def fetch(url: str, target: str, opener=urllib.request.urlopen):
    """Download ``url`` to ``target``, resuming ``target.part``; checks the announced size."""
    from tqdm import tqdm
    partial = target + ".part"
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with opener(request) as response:
        status = getattr(response, "status", 200)
        if have and status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(partial, "ab" if have else "wb") as handle, tqdm(
                total=total, initial=have, unit="B", unit_scale=True,
                desc=os.path.basename(target), file=sys.stderr) as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                handle.write(block)
                bar.update(len(block))
    size = os.path.getsize(partial)
    if total is not None and size != total:
        raise DownloadError(f"{target}: got {size} bytes, the server announced {total}; "
                            f"run again to resume")
    os.replace(partial, target)


def fetch_all(name: str, folder: str, opener=urllib.request.urlopen) -> List[str]:
    os.makedirs(folder, exist_ok=True)
    checksums = Checksums(folder)
    paths = []
    for url in SOURCES[name]["urls"]:
        target = os.path.join(folder, f"{name}-{os.path.basename(url)}"
                              if name in ("bert-base-uncased", "tinybert-4l-312")
                              else os.path.basename(url))
        if not checksums.verify(target):
            fetch(url, target, opener)
            checksums.record(target)
        paths.append(target)
    return paths


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _readable_archive(path: str):
    """A damaged or truncated archive becomes one DownloadError naming it (the tar and gzip
    readers raise EOFError, zlib.error or TarError from deep inside)."""
    try:
        yield
    except (EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DownloadError(f"{path}: damaged or truncated archive ({detail}); "
                            f"download it again") from None


def archive_members(path: str) -> List[str]:
    with _readable_archive(path):
        return _archive_members(path)


def _archive_members(path: str) -> List[str]:
    if os.path.isdir(path):
        return [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                for root, _, files in os.walk(path) for f in files]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise DownloadError(f"{path}: corrupt member {bad}")
            return archive.namelist()
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            return archive.getnames()
    raise DownloadError(f"{path}: neither a zip nor a tar archive nor a folder")


def _safe_extract(path: str, destination: str):
    """Unpack an archive, refusing members that would land outside ``destination``."""
    with _readable_archive(path):
        _extract(path, destination)


def _extract(path: str, destination: str):
    root = os.path.realpath(destination)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not os.path.realpath(os.path.join(root, member)).startswith(root + os.sep):
                    raise DownloadError(f"{path}: member {member} escapes the target folder")
            archive.extractall(destination)
        return
    with tarfile.open(path) as archive:
        archive.extractall(destination, filter="data")


def detect_kind(path: str) -> str:
    members = archive_members(path)
    names = {m.rstrip("/").split("/")[-1] for m in members}
    if {"train.tsv", "dev_matched.tsv"} <= names:
        return "mnli"
    if any(m.endswith("positive.review") for m in members):
        return "amazon"
    if set(MODEL_FILES) <= names and names & set(WEIGHT_NAMES):
        return "model"
    raise DownloadError(f"{path}: not recognised as MNLI, the Amazon reviews or a checkpoint")


def _find(root: str, name: str) -> List[str]:
    """Every ``name`` under ``root``, shallowest first: a sentence-transformers folder's own
    config.json comes before 1_Pooling/config.json."""
    found = [os.path.join(r, name) for r, _, files in os.walk(root) if name in files]
    return sorted(found, key=lambda path: (path.count(os.sep), path))


def _unpacked(source: str, scratch: str) -> str:
    """A folder as it is, or an archive unpacked into ``scratch``."""
    if os.path.isdir(source):
        return source
    folder = os.path.join(scratch, "unpacked")
    _safe_extract(source, folder)
    return folder


def _install(staging: str, target: str):
    """Replace ``target`` with ``staging`` in one rename (nothing half-written is left)."""
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(staging, target)


def layout_mnli(source: str, dataset_dir: str) -> str:
    target = os.path.join(dataset_dir, "MNLI")
    with tempfile.TemporaryDirectory(dir=dataset_dir) as scratch:
        unpacked = _unpacked(source, scratch)
        train = _find(unpacked, "train.tsv")
        if not train or not _find(os.path.dirname(train[0]), "dev_matched.tsv"):
            raise DownloadError(f"{source}: no MNLI train.tsv with dev_matched.tsv beside it")
        staging = os.path.join(scratch, "MNLI")
        shutil.copytree(os.path.dirname(train[0]), staging)
        _install(staging, target)
    return target


def layout_amazon(source: str, dataset_dir: str) -> str:
    target = os.path.join(dataset_dir, "amazon")
    with tempfile.TemporaryDirectory(dir=dataset_dir) as scratch:
        unpacked = _unpacked(source, scratch)
        staging = os.path.join(scratch, "amazon")
        found = set()
        for positive in _find(unpacked, "positive.review"):
            folder = os.path.dirname(positive)
            domain = AMAZON_FOLDERS.get(os.path.basename(folder))
            negative = os.path.join(folder, "negative.review")
            if domain is None or not os.path.isfile(negative):
                continue
            os.makedirs(os.path.join(staging, domain), exist_ok=True)
            for name in ("positive.review", "negative.review"):
                shutil.copyfile(os.path.join(folder, name), os.path.join(staging, domain, name))
            found.add(domain)
        missing = sorted({"books", "dvd", "electronics", "kitchen"} - found)
        if missing:
            raise DownloadError(f"{source}: no positive/negative.review for {', '.join(missing)}")
        _install(staging, target)
    return target


def layout_model(sources: List[str], name: str, checkpoint_dir: str) -> str:
    """A checkpoint folder from its files, a folder, or an archive holding them."""
    target = os.path.join(checkpoint_dir, name)
    os.makedirs(checkpoint_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=checkpoint_dir) as scratch:
        staging = os.path.join(scratch, name)
        os.makedirs(staging)
        for source in sources:
            if os.path.isfile(source) and not (zipfile.is_zipfile(source)
                                               or tarfile.is_tarfile(source)):
                # A fetched file, kept as <name>-<file> in the downloads folder.
                plain = os.path.basename(source)
                if plain.startswith(name + "-"):
                    plain = plain[len(name) + 1:]
                shutil.copyfile(source, os.path.join(staging, plain))
                continue
            unpacked = _unpacked(source, scratch)
            config = _find(unpacked, "config.json")
            if not config:
                raise DownloadError(f"{source}: no config.json")
            folder = os.path.dirname(config[0])
            for entry in os.listdir(folder):
                if entry in MODEL_FILES + WEIGHT_NAMES:
                    shutil.copyfile(os.path.join(folder, entry), os.path.join(staging, entry))
        present = set(os.listdir(staging))
        if not set(MODEL_FILES) <= present or not present & set(WEIGHT_NAMES):
            raise DownloadError(f"{name}: needs config.json, vocab.txt and weights; got "
                                f"{', '.join(sorted(present)) or 'nothing'}")
        _install(staging, target)
    return target


def model_name_from_config(path: str) -> str:
    """bert-base-uncased or tinybert-4l-312, from a checkpoint's config.json."""
    with tempfile.TemporaryDirectory() as scratch:
        config = utils.read_json(_find(_unpacked(path, scratch), "config.json")[0])
    sizes = (config.get("hidden_size"), config.get("num_hidden_layers"))
    if sizes == (768, 12):
        return "bert-base-uncased"
    if sizes == (312, 4):
        return "tinybert-4l-312"
    raise DownloadError(f"{path}: a checkpoint of hidden size {sizes[0]} and {sizes[1]} layers "
                        f"is neither BERT-base nor TinyBERT 4L-312")


def install(name: str, files: List[str], dataset_dir: str, checkpoint_dir: str) -> str:
    os.makedirs(dataset_dir, exist_ok=True)
    if name == "mnli":
        return layout_mnli(files[0], dataset_dir)
    if name == "amazon":
        return layout_amazon(files[0], dataset_dir)
    return layout_model(files, name, checkpoint_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument("what", nargs="*",
                        help=f"what to fetch: all, {', '.join(SOURCES)} "
                             f"(default with no --from-archive: all)")
    parser.add_argument("--from-archive", dest="archives", action="append", default=[],
                        help="an archive or folder obtained elsewhere (repeatable)")
    parser.add_argument("--dataset_dir", default="dataset")
    parser.add_argument("--checkpoint_dir", default="pretrained_ckpt")
    parser.add_argument("--downloads", default=os.path.join("dataset", "downloads"),
                        help="where fetched files are kept")
    args = parser.parse_args(argv)

    def run():
        unknown = [w for w in args.what if w != "all" and w not in SOURCES]
        if unknown:
            raise ValueError(f"unknown download {', '.join(unknown)} "
                             f"(expected all, {', '.join(SOURCES)})")
        for archive in args.archives:
            if not os.path.exists(archive):
                raise FileNotFoundError(f"{archive}: archive not found")
            kind = detect_kind(archive)
            name = model_name_from_config(archive) if kind == "model" else kind
            print(install(name, [archive], args.dataset_dir, args.checkpoint_dir))
        wanted = args.what or ([] if args.archives else ["all"])
        names = list(SOURCES) if "all" in wanted else wanted
        for name in names:
            files = fetch_all(name, args.downloads)
            print(install(name, files, args.dataset_dir, args.checkpoint_dir))

    return utils.main_guard(run)  # DownloadError is a RuntimeError: one line, exit 1


if __name__ == "__main__":
    sys.exit(main())
