"""Coupled channel groups: what the analysis finds and every later step consumes.

A *group* is a set of channels that must be removed together wherever they
appear. Channel ``c`` of a group (``0 <= c < size``) may show up at several
positions of several tensors; each appearance is recorded by a
:class:`Member`: the tensor of the **original** graph, the axis, and an index
array mapping each position of that axis to the group's channel (or -1 when
the position belongs to another group or to nothing prunable).

Removing channel ``c`` removes, in every member, every position whose index
is ``c``. Members are what the masked-reference verification, the importance
criteria and the report read. The rewrite also needs what the rules declared
besides members: the labelled axis of every tensor (``Analysis.channel_axes``)
and the attribute/shape-constant edits that must follow a removal
(``Analysis.fixups``). Both are declared fields of :class:`Analysis`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # rules import this module: only the type checker reads these names
    import onnx_graphsurgeon as gs

    from .rules.base import Fixup, Label

# Member kinds
WEIGHT_OUT = "weight_out"      # a layer weight's output axis (Conv W axis 0, Gemm/MatMul output features)
WEIGHT_IN = "weight_in"        # a layer weight's input axis (Conv W axis 1, MatMul W axis 0, ...)
PARAM = "param"                # bias, norm scale/shift/mean/var, per-channel constant of an elementwise op
ACTIVATION = "activation"      # an intermediate tensor of the graph
KINDS = (WEIGHT_OUT, WEIGHT_IN, PARAM, ACTIVATION)


@dataclass
class Member:
    tensor: str                 # name in the original graph
    axis: int                   # non-negative axis of ``tensor``
    index: np.ndarray           # int64, len == tensor.shape[axis]; position -> channel of the group or -1
    kind: str                   # one of KINDS
    node: str = ""              # the node whose use this is (producer for weight_out, consumer for weight_in)
    op: str = ""                # that node's op_type
    input_index: int = -1       # which input of ``node`` the tensor is (for weights and params)

    def positions(self, channels) -> np.ndarray:
        """Positions of this member's axis that hold any of ``channels``."""
        return np.nonzero(np.isin(self.index, np.asarray(list(channels), dtype=np.int64)))[0]

    @property
    def covered(self) -> np.ndarray:
        """Positions of this member's axis that belong to the group."""
        return np.nonzero(self.index >= 0)[0]


@dataclass
class Group:
    id: int
    size: int                                   # number of removable channels
    members: list[Member] = field(default_factory=list)
    frozen: bool = False
    reasons: list[str] = field(default_factory=list)   # why frozen (node and rule), for the report
    label: str = ""                             # a readable name: the first producing layer
    structure: str = ""                         # head, kv_head, head_dim, ffn, conv_channel or channel

    def of_kind(self, *kinds: str) -> list[Member]:
        return [m for m in self.members if m.kind in kinds]

    @property
    def layers(self) -> list[str]:
        """Nodes whose output channels this group is (the roots)."""
        seen = []
        for m in self.members:
            if m.kind == WEIGHT_OUT and m.node not in seen:
                seen.append(m.node)
        return seen

    @property
    def consumers(self) -> list[str]:
        seen = []
        for m in self.members:
            if m.kind == WEIGHT_IN and m.node not in seen:
                seen.append(m.node)
        return seen


@dataclass
class Barrier:
    node: str
    op: str
    reason: str


@dataclass
class Analysis:
    """Result of the channel-dependency analysis of one model."""

    groups: list[Group]
    barriers: list[Barrier]
    shapes: dict[str, list[int]]                # tensor name -> concrete shape used for the analysis
    input_shapes: dict[str, list[int]]
    # tensor name -> its labelled axis and the channel id of every position (see rules.base)
    channel_axes: dict[str, "Label"] = field(default_factory=dict)
    # (node of the analysed graph, edit) pairs the rewrite runs in order after slicing constants
    fixups: list[tuple["gs.Node", "Fixup"]] = field(default_factory=list)
    kv_cache: bool = False                      # KV-cache graph inputs/outputs were allowed to shrink
    # input shapes with the symbolic dimensions changed, at which the model ran (None: none found);
    # shape values folded by the analysis are checked there too
    varied_shapes: dict[str, list[int]] | None = None

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if not g.frozen and g.size > 1]

    @property
    def frozen(self) -> list[Group]:
        return [g for g in self.groups if g.frozen or g.size <= 1]

    def group(self, gid: int) -> Group:
        return self.groups[gid]
