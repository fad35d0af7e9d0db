"""Channel atoms: the unit of pruning, tied together by a union-find.

Every producer of channels (a Conv's output, a Gemm's hidden units, ...) creates a *block* of atoms, one
per channel.  A tensor's *view* is an integer array with the tensor's rank whose entries name the atom
each position along its channel axis belongs to (size 1 on axes that carry no channel structure).
Ops that force two channels to be removed together (a residual Add, a depthwise conv, a shared weight)
*merge* their atoms; the classes of the union-find are the channels a plan can remove.  Ops the tool
does not understand *block* the atoms they touch, with the reason kept for `analyze`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Block:
    """A run of atoms created by one node: `size` channels starting at atom id `start`."""

    index: int
    name: str
    node: str
    op: str
    start: int
    size: int
    param: str | None = None
    fixed: bool = False  # channels the node passes on but nothing may remove (blocked at creation)

    def atoms(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size, dtype=np.int64)


@dataclass(frozen=True)
class Tie:
    """Why two blocks belong to one group: the node whose rule merged their atoms."""

    block_a: int
    block_b: int
    node: str
    op: str


class AtomTable:
    """Union-find over atoms, with blocks, block ties and blocking reasons."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.block_of: list[int] = []
        self.blocks: list[Block] = []
        self.ties: list[Tie] = []
        self._blocked: dict[int, str] = {}
        self._tied_pairs: set[tuple[int, int]] = set()

    def new_block(
        self, name: str, node: str, op: str, size: int, param: str | None = None, *, fixed: bool = False
    ) -> np.ndarray:
        """Create `size` fresh atoms owned by a new block and return their ids."""
        start = len(self.parent)
        block = Block(len(self.blocks), name, node, op, start, size, param, fixed)
        self.blocks.append(block)
        self.parent.extend(range(start, start + size))
        self.block_of.extend([block.index] * size)
        return block.atoms()

    def find(self, atom: int) -> int:
        parent = self.parent
        root = atom
        while parent[root] != root:
            root = parent[root]
        while parent[atom] != root:
            parent[atom], atom = root, parent[atom]
        return root

    def union(self, a: int, b: int, node: str, op: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self._blocked and ra not in self._blocked:
            self._blocked[ra] = self._blocked[rb]
        blocks = (self.block_of[a], self.block_of[b])
        if blocks[0] != blocks[1]:
            key = (min(blocks), max(blocks))
            if key not in self._tied_pairs:
                self._tied_pairs.add(key)
                self.ties.append(Tie(key[0], key[1], node, op))

    def merge(self, a: np.ndarray, b: np.ndarray, node: str, op: str) -> None:
        """Tie atoms position by position (arrays broadcast against each other)."""
        left, right = (x.ravel().astype(np.int64) for x in np.broadcast_arrays(a, b))
        differ = left != right
        # distinct pairs in (left, right) order as one integer key each: np.unique over rows is slow
        size = len(self.parent)
        for key in np.unique(left[differ] * size + right[differ]).tolist():
            self.union(key // size, key % size, node, op)

    def block(self, atoms: np.ndarray, reason: str) -> None:
        """Forbid removing any of `atoms` (and everything tied to them), remembering the first reason."""
        for atom in np.unique(atoms):
            root = self.find(int(atom))
            self._blocked.setdefault(root, reason)

    def all_blocked(self, atoms: np.ndarray) -> bool:
        """Whether every one of `atoms` is blocked."""
        blocked = {self.find(root) for root in self._blocked}
        return all(self.find(int(atom)) in blocked for atom in np.unique(atoms))

    def roots(self) -> np.ndarray:
        """Class (root atom) of every atom, as one array (pointer jumping until every parent is a root)."""
        parent = np.asarray(self.parent, dtype=np.int64)
        while True:
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                return parent
            parent = grandparent

    def blocked_roots(self) -> dict[int, str]:
        """Blocked classes with their reasons, keyed by current root."""
        result: dict[int, str] = {}
        for root, reason in self._blocked.items():
            result.setdefault(self.find(root), reason)
        return result


def view_axes(view: np.ndarray) -> tuple[int, ...]:
    """Axes along which a view carries channels (size > 1)."""
    return tuple(axis for axis, size in enumerate(view.shape) if size > 1)


def channel_view(atoms: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A view of the given rank whose only channel axis is `axis`."""
    shape = [1] * rank
    shape[axis] = atoms.size
    return atoms.reshape(shape)


def compress(view: np.ndarray) -> np.ndarray:
    """Drop repetition: an axis along which every entry is equal becomes size 1."""
    for axis in range(view.ndim):
        if view.shape[axis] > 1:
            first = view.take([0], axis=axis)
            if np.array_equal(np.broadcast_to(first, view.shape), view):
                view = first
    return np.ascontiguousarray(view)
