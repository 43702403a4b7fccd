"""Options of the tagging stage: which head fills each column."""
from __future__ import annotations

from dataclasses import dataclass, field

from clipfleet.shared.options import option


def _check_spec(spec: str) -> str | None:
    if spec in ("auto", "none", ""):
        return None
    if spec.startswith("laion:"):  # LAION's released file, fetched into the model cache by run's preflight
        from clipfleet.shared.models.laion_heads import KINDS
        return None if spec[len("laion:"):] in KINDS else f"{spec!r}: laion:KIND with KIND one of {', '.join(KINDS)}"
    from clipfleet.shared.models.heads import HeadError, parse_spec
    try:
        parse_spec(spec)
    except HeadError as exc:
        return str(exc)
    return None


def _check_specs(specs) -> str | None:
    for spec in specs:
        problem = _check_spec(spec) if spec not in ("auto", "none", "") else f"{spec!r} is not a head file"
        if problem:
            return problem
    return None


_HEAD_HELP = ("auto (the head shipped with --embed-model, if any), none (a null column), "
              "shapes:TAG, mlp:FILE (from train-head), laion:KIND (LAION's released file, fetched "
              "once into the model cache)")


@dataclass
class TagOptions:
    punsafe_head: str = option("auto", f"head of the punsafe column: {_HEAD_HELP}, or LAION's NSFW "
                               "detector as a state dict, nsfw-l14:FILE or nsfw-b32:FILE", check=_check_spec)
    pwatermark_head: str = option("auto", f"head of the pwatermark column: {_HEAD_HELP}, or LAION's "
                                  "efficientnet watermark model on the shard's images, watermark-effnet:FILE",
                                  check=_check_spec)
    aesthetic_head: str = option("auto", f"head of the aesthetic column: {_HEAD_HELP}, or LAION-Aesthetics "
                                 "v2, aesthetic-l14:FILE", check=_check_spec)
    tag_heads: tuple[str, ...] = option((), "more columns: head files from `clipfleet train-head --tag NAME`, "
                                        "each adding its NAME column", metavar="FILE,...", check=_check_specs)
    watermark_batch_size: int = option(32, "images per batch for an image-based watermark model",
                                       check=lambda n: None if n > 0 else "must be positive")
    tag_threads: int = option(1, "torch threads per tagging process while it scores (the tagging queue runs "
                              "a process per core; 0: torch's default)",
                              check=lambda n: None if n >= 0 else "must be 0 or more")
    # Not a flag: filled when the run is planned, so run.json says why a column is null.
    null_columns: dict = field(default_factory=dict)
