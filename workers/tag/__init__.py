"""tagging: punsafe, pwatermark, aesthetic and user heads per embedded shard; then publish it."""
