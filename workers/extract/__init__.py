"""cpu-extract: one WAT segment -> language-tagged, deduplicated URL shards.

Importing this package is cheap; the stage and its task load only in workers that serve it.
"""
