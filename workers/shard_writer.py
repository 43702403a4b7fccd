"""Write one downloaded shard in img2dataset's webdataset layout: NNNNN.tar, .parquet, _stats.json.

Samples finish in any order; their images are spooled to a local file as they come, and the
tar and parquet are written in key order at the end, so a shard downloaded twice from the
same web is the same shard (same members, same bytes, same rows).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from shared.storage import shard_name

# img2dataset's columns after the input columns, in its order (compute_hash="sha256").
RESULT_FIELDS = [("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                 ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
                 ("original_height", pa.int32()), ("sha256", pa.string())]
# A fixed member mtime makes the tar reproducible (webdataset would stamp the current time).
TAR_MTIME = 0


def sample_key(index: int, shard: int, shard_size: int) -> str:
    """img2dataset's key: the shard id, then the index within the shard in as many digits as
    the shard size needs, zero-padded to 5 + those digits (its oom_shard_count is 5)."""
    digits = math.ceil(math.log10(max(shard_size, 2)))
    return f"{shard * 10 ** digits + index:0{5 + digits}d}"


class ShardWriter:
    def __init__(self, out_dir: Path, shard: int, input_schema: pa.Schema, encode_format: str):
        self.out_dir = out_dir
        self.name = shard_name(shard)
        self.encode_format = encode_format
        self.schema = pa.schema(list(input_schema) + [pa.field(n, t) for n, t in RESULT_FIELDS
                                                      if n not in input_schema.names])
        self.spool = open(out_dir / f"{self.name}.spool", "w+b")
        self.rows: dict[int, dict] = {}
        self.images: dict[int, tuple[int, int]] = {}  # index -> (offset, length) in the spool
        self.status_counter: Counter = Counter()  # img2dataset's status_dict: success or the error

    def add(self, index: int, meta: dict, image: bytes | None) -> None:
        """One sample's row (input columns + result fields) and its encoded image, if any."""
        self.rows[index] = meta
        self.status_counter[meta["status"] if meta["status"] == "success" else meta["error_message"]] += 1
        if image is not None:
            self.images[index] = (self.spool.tell(), len(image))
            self.spool.write(image)

    def close(self, stats: dict) -> dict[str, Path]:
        """Write the three files; returns store-relative name -> local path."""
        tar_path = self.out_dir / f"{self.name}.tar"
        with open(tar_path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=TAR_MTIME) as tar:
            for index in sorted(self.images):
                offset, length = self.images[index]
                self.spool.seek(offset)
                meta = self.rows[index]
                caption = meta.get("caption")
                tar.write({"__key__": meta["key"], self.encode_format: self.spool.read(length),
                           "txt": ("" if caption is None else str(caption)).encode(),
                           "json": json.dumps(meta, indent=4).encode()})
        self.spool.close()
        (self.out_dir / f"{self.name}.spool").unlink()

        ordered = [self.rows[i] for i in sorted(self.rows)]
        parquet_path = self.out_dir / f"{self.name}.parquet"
        table = pa.Table.from_pylist(ordered, schema=self.schema)
        pq.write_table(table, parquet_path)

        stats_path = self.out_dir / f"{self.name}_stats.json"
        stats_path.write_text(json.dumps({**stats, "status_dict": dict(self.status_counter)}, indent=4))
        return {f"images/{self.name}.tar": tar_path, f"images/{self.name}.parquet": parquet_path,
                f"images/{self.name}_stats.json": stats_path}
