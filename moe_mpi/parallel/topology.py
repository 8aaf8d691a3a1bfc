"""Rank roles and per-layer communicators (DESIGN.md section 3).

World ranks [0, F) are front ranks; rank F + l*E + e owns expert e of MoE layer l.  A world of one
rank runs everything in one process.  Each MoE layer talks on its own communicator: the F fronts
(ranks 0..F-1 in it) then that layer's E experts (ranks F..F+E-1), made from a Dup of COMM_WORLD in
``Communicators.create`` and freed in ``Communicators.free``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class Role:
    rank: int
    kind: str                   # "front" or "expert"
    front: int | None = None    # front index (fronts)
    layer: int | None = None    # MoE layer index (experts)
    expert: int | None = None   # expert index within its layer (experts)

    def describe(self, cfg: ModelConfig | None = None) -> str:
        if self.kind == "front":
            return f"rank {self.rank} (front {self.front})"
        model_layer = f", model layer {cfg.first_k_dense_replace + self.layer}" if cfg else ""
        return f"rank {self.rank} (expert {self.expert} of MoE layer {self.layer}{model_layer})"


@dataclass(frozen=True)
class Layout:
    n_fronts: int
    n_moe_layers: int
    n_experts: int

    @classmethod
    def of(cls, cfg: ModelConfig, n_fronts: int) -> "Layout":
        if n_fronts < 1:
            raise ValueError(f"--front-ranks must be >= 1, got {n_fronts}")
        return cls(n_fronts, cfg.n_moe_layers, cfg.n_routed_experts)

    @property
    def n_expert_ranks(self) -> int:
        return self.n_moe_layers * self.n_experts

    @property
    def world_size(self) -> int:
        return self.n_fronts + self.n_expert_ranks

    def role(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        if rank < self.n_fronts:
            return Role(rank, "front", front=rank)
        layer, expert = divmod(rank - self.n_fronts, self.n_experts)
        return Role(rank, "expert", layer=layer, expert=expert)

    def expert_rank(self, layer: int, expert: int) -> int:
        return self.n_fronts + layer * self.n_experts + expert

    def layer_ranks(self, layer: int) -> list[int]:
        """World ranks of a layer's communicator, in communicator order: fronts, then experts."""
        return list(range(self.n_fronts)) + [self.expert_rank(layer, e) for e in range(self.n_experts)]


def check_world_size(cfg: ModelConfig, world_size: int, n_fronts: int) -> Layout | None:
    """The layout for this launch, None for the 1-rank run; a wrong size is a ValueError naming sizes
    that would work."""
    if world_size == 1:
        return None
    layout = Layout.of(cfg, n_fronts)
    if world_size != layout.world_size:
        fits = ", ".join(f"{Layout.of(cfg, f).world_size} for --front-ranks {f}" for f in (1, 2, 4, 8))
        raise ValueError(
            f"world size {world_size} does not fit config {cfg.name!r} with --front-ranks {n_fronts}: "
            f"it needs F + {cfg.n_routed_experts} experts x {cfg.n_moe_layers} MoE layers = "
            f"{layout.world_size} ranks ({fits}), or 1 rank for the single-process run")
    return layout


class Communicators:
    """COMM_WORLD's Dup and one communicator per MoE layer this rank belongs to."""

    def __init__(self, world, layers: dict):
        self.world = world          # our Dup of COMM_WORLD
        self.layers = layers        # MoE layer index -> communicator (fronts first, then experts)

    @classmethod
    def create(cls, comm_world, layout: Layout) -> "Communicators":
        from mpi4py import MPI

        world = comm_world.Dup()
        role = layout.role(world.Get_rank())
        mine = range(layout.n_moe_layers) if role.kind == "front" else [role.layer]
        layers = {}
        for layer in mine:
            group = world.Get_group().Incl(layout.layer_ranks(layer))
            layers[layer] = world.Create_group(group, tag=layer)
            group.Free()
        assert all(c != MPI.COMM_NULL for c in layers.values())
        return cls(world, layers)

    def free(self) -> None:
        for comm in self.layers.values():
            comm.Free()
        self.layers = {}
        self.world.Free()
