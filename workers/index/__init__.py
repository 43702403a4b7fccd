"""index-merge: train one KNN index per run, add shards as they arrive, merge for serving."""
