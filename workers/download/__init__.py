"""cpu-download: one URL shard -> resized webdataset shard in img2dataset's layout.

fetch (guarded, bounded, polite HTTP through http1), guard (address checks), politeness (per-host
limits through Redis), blocklist, resize, writer (the tar), stage (the loop that ties them).
Importing this package is cheap; the stage and its task load only in workers that serve it.
"""
