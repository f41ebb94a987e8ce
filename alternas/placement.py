"""Placement strings: which blocks of each stage are Conv (``C``) and which are MSA (``M``).

``CCC,CCCM,CCCCCM,CMCM`` is the paper's CIFAR-100 AlterNet-50: stages separated by commas, one letter a block.
The reference code only builds the pattern ``[C]*(n-2k) + [C, M]*k`` per stage (MSAs alternate from the end of a
stage); a placement may be any string, and ``msa_counts()`` tells whether it is of that pattern.

This module is pure Python (no torch) so that searches and policies can reason about placements cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from alternas.errors import PlacementError

BlockKind = Literal["conv", "msa"]
_LETTERS = {"C": "conv", "M": "msa"}


@dataclass(frozen=True)
class Placement:
    """An immutable, canonical placement: one string of ``C``/``M`` per stage."""

    stages: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise PlacementError("empty placement: give one group of C/M letters per stage, e.g. 'CC,CM,CM,CM'")
        for i, stage in enumerate(self.stages):
            if not stage:
                raise PlacementError(f"stage {i + 1} is empty: every stage needs at least one block (C or M)")
            bad = [ch for ch in stage if ch not in _LETTERS]
            if bad:
                raise PlacementError(
                    f"stage {i + 1} has unknown block letter {bad[0]!r}: use C for a Conv block, M for an MSA block"
                )

    # -- text form -----------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | Placement) -> Placement:
        """Parse ``text`` (case-insensitive, whitespace ignored); errors point at the offending character."""
        if isinstance(text, Placement):
            return text
        if not isinstance(text, str):
            raise PlacementError(f"a placement must be a string like 'CC,CM,CM,CM', got {type(text).__name__}")
        compact = "".join(text.split()).upper()
        if not compact:
            raise PlacementError("empty placement: give one group of C/M letters per stage, e.g. 'CC,CM,CM,CM'")
        for pos, ch in enumerate(compact):
            if ch not in _LETTERS and ch != ",":
                stage = compact[:pos].count(",") + 1
                raise PlacementError(
                    f"placement {compact!r}: unknown block letter {ch!r} at character {pos + 1} (stage {stage}); "
                    "use C for a Conv block, M for an MSA block and ',' between stages"
                )
        stages = compact.split(",")
        for i, stage in enumerate(stages):
            if not stage:
                raise PlacementError(
                    f"placement {compact!r}: stage {i + 1} is empty (two commas in a row, or a leading/trailing "
                    "comma); every stage needs at least one block"
                )
        return cls(tuple(stages))

    def __str__(self) -> str:
        return ",".join(self.stages)

    # -- reference pattern ---------------------------------------------------------------------------------------
    @classmethod
    def from_counts(cls, depths: Sequence[int], msa_counts: Sequence[int]) -> Placement:
        """The reference code's ``_make_layer`` pattern: ``[C]*(n-2k) + [C, M]*k`` for each stage."""
        if len(depths) != len(msa_counts):
            raise PlacementError(f"{len(depths)} stage depths but {len(msa_counts)} MSA counts")
        stages = []
        for i, (n, k) in enumerate(zip(depths, msa_counts)):
            if n < 1 or k < 0 or 2 * k > n:
                raise PlacementError(
                    f"stage {i + 1}: {k} MSA block(s) cannot alternate with Conv blocks in a stage of {n} "
                    f"block(s); at most {max(n, 0) // 2} fit"
                )
            stages.append("C" * (n - 2 * k) + "CM" * k)
        return cls(tuple(stages))

    def msa_counts(self) -> tuple[int, ...] | None:
        """Per-stage MSA counts if every stage follows the reference pattern, else ``None``."""
        counts = tuple(stage.count("M") for stage in self.stages)
        return counts if self == Placement.from_counts(self.depths, counts) else None

    @classmethod
    def all_conv(cls, depths: Sequence[int]) -> Placement:
        return cls.from_counts(depths, [0] * len(depths))

    # -- inspection ----------------------------------------------------------------------------------------------
    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(stage) for stage in self.stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_msa(self) -> int:
        return sum(stage.count("M") for stage in self.stages)

    def blocks(self) -> list[tuple[int, int, BlockKind]]:
        """``(stage, index, kind)`` for every block, 0-indexed, in forward order."""
        return [(s, b, _LETTERS[ch]) for s, stage in enumerate(self.stages) for b, ch in enumerate(stage)]

    def msa_positions(self) -> tuple[tuple[int, ...], ...]:
        """1-indexed MSA positions per stage, as PAPER.md §3.3 writes them (``c4:{2,4}``)."""
        return tuple(tuple(b + 1 for b, ch in enumerate(stage) if ch == "M") for stage in self.stages)

    def describe(self) -> str:
        """Human form of the MSA positions, e.g. ``c3:{6} c4:{2,4}`` (``none`` for an all-Conv net)."""
        parts = [
            f"c{s + 1}:{{{','.join(map(str, pos))}}}" for s, pos in enumerate(self.msa_positions()) if pos
        ]
        return " ".join(parts) if parts else "none"

    # -- the build-up move ---------------------------------------------------------------------------------------
    def next_msa_position(self, stage: int) -> int | None:
        """Where rule 1 puts the next MSA of ``stage``: the last block, then 3rd-from-last, 5th-from-last, …

        The first block of a stage is never a candidate (it subsamples in every stage but the first, and the
        reference pattern always keeps it Conv). ``None`` when the stage has no such position left.
        """
        self._check_stage(stage)
        blocks = self.stages[stage]
        for pos in range(len(blocks) - 1, 0, -2):
            if blocks[pos] == "C":
                return pos
        return None

    def add_msa(self, stage: int) -> Placement | None:
        """One more MSA in ``stage``, alternately from its end (build-up rule 1); ``None`` if none fits."""
        pos = self.next_msa_position(stage)
        if pos is None:
            return None
        blocks = self.stages[stage]
        new_stage = blocks[:pos] + "M" + blocks[pos + 1 :]
        return Placement(self.stages[:stage] + (new_stage,) + self.stages[stage + 1 :])

    def _check_stage(self, stage: int) -> None:
        if not 0 <= stage < self.num_stages:
            raise PlacementError(f"stage index {stage} is out of range for a {self.num_stages}-stage placement")


def feature_sizes(image_size: int, num_stages: int, stem_pool: bool) -> tuple[int, ...]:
    """Spatial size of each stage's feature map (the stage's output, after its first block's stride).

    The stem is a stride-1 3x3 conv for small images and a 7x7/2 conv + 3x3/2 max-pool for large ones; every
    stage after the first halves the map with a stride-2 3x3 conv (padding 1), i.e. ``ceil(size / 2)``.
    """
    size = image_size
    if stem_pool:
        size = (size + 1) // 2  # 7x7 conv, stride 2, padding 3
        size = (size + 1) // 2  # 3x3 max-pool, stride 2, padding 1
    sizes = []
    for stage in range(num_stages):
        if stage > 0:
            size = (size + 1) // 2
        sizes.append(size)
    return tuple(sizes)


def validate_for_model(
    placement: Placement, *, num_stages: int, image_size: int, window_size: int, stem_pool: bool
) -> None:
    """Check that ``placement`` can be built: stage count, no MSA on a strided block, windows tile the maps."""
    if placement.num_stages != num_stages:
        raise PlacementError(
            f"placement {placement} has {placement.num_stages} stage(s) but the base has {num_stages}; "
            f"give {num_stages} comma-separated groups"
        )
    sizes = feature_sizes(image_size, num_stages, stem_pool)
    for s, stage in enumerate(placement.stages):
        if s > 0 and stage[0] == "M":
            raise PlacementError(
                f"placement {placement}: stage {s + 1} starts with M, but the first block of stage {s + 1} "
                "subsamples (stride 2) and an MSA block cannot; make it C"
            )
        if "M" in stage and sizes[s] % window_size:
            raise PlacementError(
                f"placement {placement}: stage {s + 1} holds an MSA block but its {sizes[s]}x{sizes[s]} feature map "
                f"is not tiled by {window_size}x{window_size} windows (image size {image_size}); choose a window "
                f"size that divides {sizes[s]} or move the MSA to another stage"
            )
