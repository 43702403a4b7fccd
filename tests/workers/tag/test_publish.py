"""The published shard's pieces: LAION's hash, and the tar reader against Python's tarfile."""
from __future__ import annotations

import io
import tarfile

import mmh3
import pytest

from clipfleet.workers.tag.publish import TarError, laion_hash, read_tar


def test_the_hash_is_laions_mmh3_of_url_and_text():
    url, text = "http://127.0.0.1:1/img/000001.jpg", "a red circle on a plain background"
    assert laion_hash(url, text) == mmh3.hash64(url + text)[0]
    assert laion_hash(url, text) != laion_hash(url, text + " ")
    assert -(2 ** 63) <= laion_hash(url, "ねこ") < 2 ** 63  # signed 64 bits, any script
    assert laion_hash(url, None) == mmh3.hash64(url)[0]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_read_tar_reads_what_tarfile_writes(fmt):
    members = {"000000001.jpg": b"\xff\xd8jpeg", "000000001.json": b"{}", "d" * 60 + "/" + "x" * 90 + ".txt": b"long",
               "empty.txt": b"", "caf\u00e9.txt": "ünïcode".encode()}
    if fmt != tarfile.USTAR_FORMAT:
        members["y" * 150 + ".txt"] = b"a name only GNU and pax headers can carry"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        directory = tarfile.TarInfo("adir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
    assert dict(read_tar(io.BytesIO(buf.getvalue()))) == members


def test_a_corrupt_or_cut_tar_is_refused_clearly():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 2000
        tar.addfile(info, io.BytesIO(b"x" * 2000))
    data = bytearray(buf.getvalue())
    with pytest.raises(TarError, match="cut short"):
        list(read_tar(io.BytesIO(bytes(data[:1200])), "images/00000.tar"))
    data[10] ^= 0xFF
    with pytest.raises(TarError, match="images/00000.tar: member 0 has a bad header checksum"):
        list(read_tar(io.BytesIO(bytes(data)), "images/00000.tar"))
