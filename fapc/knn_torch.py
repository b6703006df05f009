"""Exact k-nearest neighbours in plain torch (CUDA or CPU): a uniform grid with sorted cell
keys and a ring search that grows until the k-th neighbour is certain.

A query's candidates are the points of the ``(2r+1)^3`` cells around its cell. Any point
outside that cube is at least ``r * h`` away (``h``: the cell size), so once the k-th
candidate distance is ``<= r * h`` the answer is exact; queries that are not certain yet are
searched again with ``r + 1``. The certain radius is the query's distance to the searched
cube's boundary, ``(r + min(f, 1 - f)) * h`` with ``f`` its place inside its own cell, not
just ``r * h``: fewer queries need a second ring. Cells are looked up in a dense table of
run starts where the grid has at most :data:`TABLE_CELLS` cells (two gathers per cell),
else by binary search in the sorted keys; after ``max_ring`` rings a 4x coarser grid takes over
(and after six levels, brute force). The result does
not depend on the axes (exact search), so it keeps rotation equivariance, and sparse regions
(LiDAR far from the sensor) only cost more rings.
"""

from __future__ import annotations

import torch

ROW_BUDGET = 1 << 26  # entries of the (queries, candidates) block of one ring search
TABLE_CELLS = 1 << 25  # grids up to this many cells look runs up in a dense table
CELL_FACTOR = 1.2  # cell size over the median k-th neighbour distance (fastest on an H200)


def _cell_size(points: torch.Tensor, k: int, *, probes: int = 256, seed: int = 0) -> float:
    """The median k-th neighbour distance of a few random probes (brute force)."""
    n = points.shape[0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    pick = torch.randint(n, (min(probes, n),), generator=g).to(points.device)
    best = None
    for s in range(0, n, 1 << 20):
        d = torch.cdist(points[pick], points[s:s + (1 << 20)])  # (P, C)
        cand = d.topk(min(k, d.shape[1]), dim=1, largest=False).values
        best = cand if best is None else torch.cat([best, cand], 1).topk(
            min(k, best.shape[1] + cand.shape[1]), dim=1, largest=False).values
    kth = best[:, -1]
    h = float(kth.median())
    return h if h > 0 else float((points.max(0).values - points.min(0).values).max() + 1) / 1e3


class GridKNN:
    """Grid over ``points (N, 3)`` (any device); ``query(q, k)`` returns ``(Q, k)`` indices,
    nearest first, and their distances."""

    def __init__(self, points: torch.Tensor, k_hint: int = 32, *, cell: float | None = None,
                 max_ring: int = 2, level: int = 0) -> None:
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points must have shape (N, 3), got {tuple(points.shape)}")
        self.points = points
        self.max_ring = max_ring
        self.level = level
        self._coarser: GridKNN | None = None
        self.h = cell if cell is not None else CELL_FACTOR * _cell_size(points, k_hint)
        self.lo = points.min(0).values
        cells = self._cells(points)  # (N, 3)
        self.dims = cells.max(0).values + 1 + 2 * (max_ring + 1)
        keys = self._key(cells)
        self.keys, self.order = torch.sort(keys)
        self.table: torch.Tensor | None = None  # (cells + 1,) int32: first sorted row per key
        total = int(self.dims.prod())
        if total <= TABLE_CELLS:
            self.table = torch.zeros(total + 1, dtype=torch.int32, device=points.device)
            self.table[1:] = torch.cumsum(torch.bincount(self.keys, minlength=total), 0)

    def _cells(self, p: torch.Tensor) -> torch.Tensor:
        return torch.floor((p - self.lo) / self.h).long() + (self.max_ring + 1)

    def _key(self, cells: torch.Tensor) -> torch.Tensor:
        cells = cells.clamp(min=0)
        cells = torch.minimum(cells, self.dims - 1)
        return (cells[..., 0] * self.dims[1] + cells[..., 1]) * self.dims[2] + cells[..., 2]

    def _runs(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted-row ranges ``[start, end)`` of the cells ``keys`` (any shape), int64."""
        if self.table is not None:
            return self.table[keys].long(), self.table[keys + 1].long()
        return (torch.searchsorted(self.keys, keys),
                torch.searchsorted(self.keys, keys, right=True))

    def query(self, q: torch.Tensor, k: int, *, chunk: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ``k`` nearest of each row of ``q (Q, 3)``: indices ``(Q, k)`` int64 and
        distances ``(Q, k)``, ascending. ``chunk``: queries per pass (default 2^16 on a CPU,
        2^18 on a GPU, where fewer, longer passes pay)."""
        n = self.points.shape[0]
        chunk = chunk or (1 << 18 if q.device.type == "cuda" else 1 << 16)
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        idx = torch.empty(q.shape[0], k, dtype=torch.long, device=q.device)
        dist = torch.empty(q.shape[0], k, dtype=q.dtype, device=q.device)
        # queries in cell order: neighbouring queries read the same cells and candidates
        # (coherent memory access), and each chunk is a compact region
        perm = torch.argsort(self._key(self._cells(q)))  # (Q,)
        for s in range(0, q.shape[0], chunk):
            rows = perm[s:s + chunk]
            idx[rows], dist[rows] = self._query_chunk(q[rows], k)
        return idx, dist

    def _query_chunk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = q.shape[0]
        out_i = torch.empty(m, k, dtype=torch.long, device=q.device)
        out_d = torch.empty(m, k, dtype=q.dtype, device=q.device)
        todo = torch.arange(m, device=q.device)
        qc = self._cells(q)
        f = (q - self.lo) / self.h
        f = f - torch.floor(f)  # (M, 3) place inside the own cell, in [0, 1)
        # distance to the own cell's nearest face, in cells (less a rounding allowance)
        margin = (torch.minimum(f, 1 - f).min(1).values - 1e-4).clamp(min=0)  # (M,)
        for r in range(1, self.max_ring + 1):
            if todo.numel() == 0:
                break
            i, d, ok = self._ring(q[todo], qc[todo], margin[todo], k, r)
            out_i[todo[ok]], out_d[todo[ok]] = i[ok], d[ok]
            todo = todo[~ok]
        if todo.numel() and self.level < 6:  # sparse region: a 4x coarser grid
            if self._coarser is None:
                self._coarser = GridKNN(self.points, cell=self.h * 4, max_ring=self.max_ring,
                                        level=self.level + 1)
            out_i[todo], out_d[todo] = self._coarser._query_chunk(q[todo], k)
        elif todo.numel():  # still unresolved: brute force in slices, exact
            for s in range(0, todo.numel(), 256):
                t = todo[s:s + 256]
                d, i = torch.cdist(q[t], self.points).topk(k, dim=1, largest=False)
                out_i[t], out_d[t] = i, d
        return out_i, out_d

    def _ring(self, q: torch.Tensor, qc: torch.Tensor, margin: torch.Tensor, k: int, r: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Search the ``(2r+1)^3`` cells around each query ``q (M, 3)`` (cells ``qc (M, 3)``,
        ``margin (M,)``: distance to its own cell's nearest face, in cells): the ``k``
        nearest candidates ``(M, k)`` and their distances, and whether that is certain."""
        dev = q.device
        rng = torch.arange(-r, r + 1, device=dev)
        off = torch.stack(torch.meshgrid(rng, rng, rng, indexing="ij"), -1).reshape(-1, 3)
        keys = self._key(qc.unsqueeze(1) + off.unsqueeze(0))  # (M, C)
        start, end = self._runs(keys)
        counts = (end - start).reshape(-1)  # (M*C,)
        per_query = counts.reshape(q.shape[0], -1).sum(1)  # (M,)
        width = int(per_query.max())  # the longest candidate list: one padded row each
        if q.shape[0] > 1 and q.shape[0] * width > ROW_BUDGET:
            half = q.shape[0] // 2  # dense spots: fewer queries per padded block
            a = self._ring(q[:half], qc[:half], margin[:half], k, r)
            b = self._ring(q[half:], qc[half:], margin[half:], k, r)
            return tuple(torch.cat([x, y]) for x, y in zip(a, b, strict=True))
        total = int(per_query.sum())
        if total == 0 or width < k:  # no query has k candidates yet
            return (torch.zeros(q.shape[0], k, dtype=torch.long, device=dev),
                    torch.zeros(q.shape[0], k, dtype=q.dtype, device=dev),
                    torch.zeros(q.shape[0], dtype=torch.bool, device=dev))
        qid = torch.repeat_interleave(torch.arange(q.shape[0], device=dev), per_query,
                                      output_size=total)  # output_size: no extra host sync
        seg = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts,
                                      output_size=total)
        first = torch.cumsum(counts, 0) - counts  # position of each cell's run
        pos = torch.arange(total, device=dev) - first[seg] + start.reshape(-1)[seg]
        cand = self.order[pos]  # (T,) point indices
        d = (self.points[cand] - q[qid]).norm(dim=1)
        # each query's candidates in one padded row, then a row-wise top-k (no global sort)
        base = torch.cumsum(per_query, 0) - per_query  # (M,)
        slot = torch.arange(total, device=dev) - base[qid]  # place within the query's row
        rows = torch.full((q.shape[0], width), float("inf"), dtype=d.dtype, device=dev)
        rows[qid, slot] = d
        dk, j = rows.topk(k, dim=1, largest=False, sorted=True)  # (M, k)
        sel = (base.unsqueeze(1) + j).clamp(max=total - 1)  # j < per_query where it counts
        # certain when no point outside the searched cube can be nearer than the k-th
        ok = (per_query >= k) & (dk[:, -1] <= (r + margin) * self.h)
        return cand[sel], dk, ok
