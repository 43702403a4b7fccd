"""Sample ids that every side computes the same way."""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc


def utf8_bytes(strings) -> list[bytes]:
    return strings.cast(pa.binary()).to_numpy(zero_copy_only=False).tolist()


def pair_uid(url: str, caption: str) -> str:
    return hashlib.blake2b(f"{url}\n{caption}".encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def pair_uids(urls, captions) -> pa.Array:
    """pair_uid of each url and caption of two pyarrow arrays."""
    blake2b = hashlib.blake2b
    joined = utf8_bytes(pc.binary_join_element_wise(urls, captions, "\n"))
    return pa.array([blake2b(data, digest_size=16).hexdigest() for data in joined], pa.string())
