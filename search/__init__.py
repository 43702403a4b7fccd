"""The search service (clip-back compatible API and web UI) and subset export."""
