"""gpu-embed: image and text embeddings of the kept samples, in clip-retrieval's layout."""
