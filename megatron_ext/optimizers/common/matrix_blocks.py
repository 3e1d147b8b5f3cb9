"""How one fused weight matrix splits into the matrices an orthogonalising optimizer (Muon) treats
one by one.

megatron-core fuses several linear maps into one weight:

* ``linear_qkv``: per query group ``g`` (of G), the rows of its queries (heads per group x head
  dim), then its key rows and its value rows (head dim each): ``[G, (H/G + 2) d, cols]``. Under
  tensor parallelism each rank holds whole groups, so the gathered shards are this layout again.
* ``linear_fc1`` of a gated MLP (SwiGLU): ``[gate; up]``. Tensor parallelism splits it with stride
  2: rank r holds ``[gate_r; up_r]``, so the gathered shards are ``[gate_0; up_0; gate_1; ...]``.

``MatrixBlocks.split`` views a WHOLE matrix (TP shards gathered) as a list of batches
``[k, rows, cols]`` of the blocks to treat separately; ``merge`` puts the blocks' results back in
the fused layout. Kinds: ``whole`` (one block), ``qkv`` (Q of all groups, K, V: megatron-core's
``split_qkv``), ``heads`` (every query, key and value head alone), ``gate_up`` (gate and up).
"""
from __future__ import annotations

import dataclasses
from typing import List

import torch

KINDS = ("whole", "qkv", "heads", "gate_up")


@dataclasses.dataclass(frozen=True)
class MatrixBlocks:
    kind: str = "whole"
    groups: int = 1  # qkv: query groups of the whole model
    heads_per_group: int = 1  # qkv: query heads per group
    head_dim: int = 0  # qkv, heads: rows of one head

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown matrix split {self.kind!r}")

    def _qkv_rows(self, full: torch.Tensor) -> None:
        expected = self.groups * (self.heads_per_group + 2) * self.head_dim
        if full.dim() != 2 or full.size(0) != expected:
            raise RuntimeError(f"fused QKV matrix of shape {tuple(full.shape)} does not have {self.groups} groups x "
                               f"({self.heads_per_group} query + 2) heads x {self.head_dim} rows")

    def split(self, full: torch.Tensor, tp_shards: int = 1) -> List[torch.Tensor]:
        """The blocks of ``full`` as batches ``[k, rows, cols]`` (views where the layout allows).
        ``tp_shards``: how many tensor-parallel shards ``full`` was gathered from (gate_up)."""
        cols = full.size(-1)
        if self.kind == "whole":
            return [full.unsqueeze(0)]
        if self.kind == "heads":
            self._qkv_rows(full)
            return [full.view(-1, self.head_dim, cols)]
        if self.kind == "qkv":
            self._qkv_rows(full)
            q_rows = self.heads_per_group * self.head_dim
            per_group = full.view(self.groups, q_rows + 2 * self.head_dim, cols)
            q, k, v = per_group.split([q_rows, self.head_dim, self.head_dim], dim=1)
            return [t.reshape(1, -1, cols) for t in (q, k, v)]
        # gate_up: [shard][gate|up][rows of the shard]
        halves = full.view(tp_shards, 2, -1, cols)
        return [halves[:, 0].reshape(1, -1, cols), halves[:, 1].reshape(1, -1, cols)]

    def merge(self, parts: List[torch.Tensor], tp_shards: int = 1) -> torch.Tensor:
        """The inverse of :meth:`split`: the blocks' results in the fused layout ([rows, cols])."""
        cols = parts[0].size(-1)
        if self.kind in ("whole", "heads"):
            return parts[0].reshape(-1, cols)
        if self.kind == "qkv":
            q, k, v = (p.reshape(self.groups, -1, cols) for p in parts)
            return torch.cat([q, k, v], dim=1).reshape(-1, cols)
        gate, up = (p.reshape(tp_shards, -1, cols) for p in parts)
        return torch.stack([gate, up], dim=1).reshape(-1, cols)


WHOLE = MatrixBlocks()
