"""The embed tests use the CLIP tests' world: sandbox shards downloaded by the real download stage."""
from tests.workers.clip.conftest import downloaded, letterboxed, session_redis  # noqa: F401
