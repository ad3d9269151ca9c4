"""The index directory contract (DESIGN.md): its file names, format number and the ids.parquet schema.

One place for what `icar index` writes and `icar search` and `icar reindex` read.
"""

from __future__ import annotations

import pyarrow as pa

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
INDEX_JSON = "index.json"
IVFDATA_FILE = "index.ivfdata"
TRAINED_FILE = "trained.faiss"  # the trained, empty index: a later build can add into it instead of training
INDEX_FORMAT = 1
ID_COLUMNS = ["key", "source", "caption", "url"]
IDS_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),  # the FAISS id of the vector
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
    ]
)
