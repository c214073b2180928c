"""download.py on archives built here (no network): layouts, detection, resume, checksums."""
import io
import json
import os
import tarfile
import zipfile

import pytest

import download
from data_processing import AmazonProcessor, MnliProcessor

HEADER = ("index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\t"
          "label1\tgold_label\n")


def mnli_zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        rows = [f"{i}\t1\t1e\tfiction\tx\ty\tx\ty\tp {i}\th {i}\tneutral\tneutral\n"
                for i in range(20)]
        archive.writestr("MNLI/train.tsv", HEADER + "".join(rows))
        archive.writestr("MNLI/dev_matched.tsv", HEADER + "".join(rows[:5]))
        archive.writestr("MNLI/dev_mismatched.tsv", HEADER)
    return path


def review(text):
    return f"<review>\n<rating>\n5.0\n</rating>\n<review_text>\n{text}\n</review_text>\n</review>\n"


def amazon_tar(path, folders=("books", "dvd", "electronics", "kitchen_&_housewares")):
    with tarfile.open(path, "w:gz") as archive:
        for folder in folders:
            for name in ("positive.review", "negative.review", "unlabeled.review"):
                data = "".join(review(f"{folder} {name} {i}") for i in range(10)).encode()
                info = tarfile.TarInfo(f"sorted_data/{folder}/{name}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def model_zip(path, hidden, layers):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/config.json", json.dumps({"hidden_size": hidden,
                                                          "num_hidden_layers": layers}))
        archive.writestr("model/vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
        archive.writestr("model/pytorch_model.bin", b"weights")
    return path


def test_from_archives_lays_out_everything(tmp_path):
    data, ckpt = tmp_path / "dataset", tmp_path / "pretrained_ckpt"
    args = ["--dataset_dir", str(data), "--checkpoint_dir", str(ckpt)]
    for archive in (mnli_zip(tmp_path / "MNLI.zip"), amazon_tar(tmp_path / "unprocessed.tar.gz"),
                    model_zip(tmp_path / "bert.zip", 768, 12),
                    model_zip(tmp_path / "tiny.zip", 312, 4)):
        args += ["--from-archive", str(archive)]
    assert download.main(args) == 0
    assert len(MnliProcessor().read_splits(str(data / "MNLI"), "fiction")["train"]) == 18
    assert sorted(os.listdir(data / "amazon")) == ["books", "dvd", "electronics", "kitchen"]
    assert sorted(os.listdir(data / "amazon" / "kitchen")) == ["negative.review",
                                                               "positive.review"]
    splits = AmazonProcessor().read_splits(str(data / "amazon"), "kitchen")
    assert sum(len(s) for s in splits.values()) == 20
    for name in ("bert-base-uncased", "tinybert-4l-312"):
        assert sorted(os.listdir(ckpt / name)) == ["config.json", "pytorch_model.bin",
                                                   "vocab.txt"]
    leftovers = [n for n in os.listdir(data) if n not in ("MNLI", "amazon")]
    assert leftovers == []


def test_bad_archives_fail_cleanly(tmp_path, capsys):
    data = tmp_path / "dataset"
    incomplete = amazon_tar(tmp_path / "partial.tar.gz", folders=("books", "dvd"))
    assert download.main(["--dataset_dir", str(data), "--from-archive", str(incomplete)]) == 1
    assert "no positive/negative.review for electronics, kitchen" in capsys.readouterr().err
    assert not (data / "amazon").exists() and os.listdir(data) == []
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not an archive")
    assert download.main(["--dataset_dir", str(data), "--from-archive", str(junk)]) == 1
    assert "neither a zip nor a tar" in capsys.readouterr().err
    assert download.main(["--from-archive", str(tmp_path / "missing.zip")]) == 1


class FakeResponse(io.BytesIO):
    def __init__(self, data, status=200, length=None):
        super().__init__(data)
        self.status = status
        self.headers = {"Content-Length": str(len(data) if length is None else length)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_fetch_resumes_a_partial_file(tmp_path):
    payload = bytes(range(256)) * 40
    target = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(payload[:1000])
    seen = {}

    def opener(request):
        seen["range"] = request.headers.get("Range")
        return FakeResponse(payload[1000:], status=206)

    download.fetch("http://example.invalid/file.bin", str(target), opener)
    assert seen["range"] == "bytes=1000-"
    assert target.read_bytes() == payload and not (tmp_path / "file.bin.part").exists()


def test_fetch_detects_a_short_transfer_and_keeps_the_part(tmp_path):
    target = tmp_path / "file.bin"
    with pytest.raises(download.DownloadError, match="got 10 bytes, the server announced 50"):
        download.fetch("http://x.invalid/f", str(target),
                       lambda request: FakeResponse(b"0123456789", length=50))
    assert (tmp_path / "file.bin.part").read_bytes() == b"0123456789" and not target.exists()


def test_checksums_catch_corruption(tmp_path):
    path = tmp_path / "MNLI.zip"
    path.write_bytes(b"abc")
    sums = download.Checksums(str(tmp_path))
    assert not sums.verify(str(path))
    sums.record(str(path))
    assert download.Checksums(str(tmp_path)).verify(str(path))
    path.write_bytes(b"abd")
    with pytest.raises(download.DownloadError, match="does not match its recorded SHA-256"):
        download.Checksums(str(tmp_path)).verify(str(path))
