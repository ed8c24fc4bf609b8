"""Exact top-k search by normalized cross-correlation (NCC), tolerant to small translations.

The engine of the memorization audit (`cxr.privacy.audit`), the duplicate search (`cxr.privacy.dedup`) and the
embedding audit
(`cxr.privacy.embedding`, whose L2-normalized embeddings make the same dot product a cosine): rows are standardized
(zero mean, unit norm) so that NCC(a, b) = a . b, and the top-k runs as chunked matrix products whose chunk
sizes come from a memory budget, so no N_queries x N_refs matrix is ever held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def standardize(vectors):
    """Rows with zero mean and unit L2 norm (float32), so that NCC(a, b) = a . b.

    A constant image has no structure to correlate: its row becomes all zeros (NCC 0 with anything).
    """
    vectors = torch.as_tensor(vectors, dtype=torch.float32).reshape(len(vectors), -1)
    centered = vectors - vectors.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(centered, dim=1, keepdim=True)
    return centered / torch.where(norms > 0, norms, torch.ones_like(norms))


def standardize_in_place(thumbs, rows: int = 4096):
    """`standardize` of (N, H, W) thumbnails into their own storage, a chunk of rows at a time, as (N, H*W)
    (so that 20,000 thumbnails do not need two more copies of themselves)."""
    features = thumbs.reshape(len(thumbs), -1)
    for start in range(0, len(features), rows):
        features[start : start + rows] = standardize(features[start : start + rows])
    return features


def chunk_sizes(num_queries: int, num_refs: int, memory_budget_mb: float) -> tuple[int, int]:
    """(query_chunk, ref_chunk) such that one block of scores and its top-k fit the budget.

    A block costs about 2 x query_chunk x ref_chunk float32 (the scores and topk's work space).
    """
    cells = max(1, int(memory_budget_mb * 2**20 / (2 * 4)))
    query_chunk = max(1, min(num_queries, int(math.sqrt(cells))))
    ref_chunk = max(1, min(num_refs, cells // query_chunk))
    return query_chunk, ref_chunk


def ncc_topk(queries, refs, k: int, *, memory_budget_mb: float = 512, device=None, progress: bool = False):
    """Exact top-k by NCC of standardized rows: (scores (Nq, k) descending, indices (Nq, k) int64).

    Computed block by block (`chunk_sizes`), keeping a running top-k, so memory stays bounded whatever
    Nq x Nr is. `queries` and `refs` stay where they are; only the current chunks are moved to `device`.
    """
    device = torch.device(device or "cpu")
    num_queries, num_refs = len(queries), len(refs)
    k = min(k, num_refs)
    query_chunk, ref_chunk = chunk_sizes(num_queries, num_refs, memory_budget_mb)
    best_scores = torch.empty((num_queries, k), dtype=torch.float32)
    best_indices = torch.empty((num_queries, k), dtype=torch.int64)
    blocks = math.ceil(num_queries / query_chunk) * math.ceil(num_refs / ref_chunk)
    with tqdm(total=blocks, desc="nearest neighbours", unit="block", disable=not progress or None) as bar:
        # One buffer for every block: fresh allocations of varying size fragment the heap and let the
        # process grow far beyond the budget (glibc raises its mmap threshold after the first free).
        block_buffer = torch.empty(query_chunk * ref_chunk, dtype=torch.float32, device=device)
        for q0 in range(0, num_queries, query_chunk):
            query_block = queries[q0 : q0 + query_chunk].to(device, torch.float32)
            scores = torch.full((len(query_block), 0), -math.inf, device=device)
            indices = torch.empty((len(query_block), 0), dtype=torch.int64, device=device)
            for r0 in range(0, num_refs, ref_chunk):
                ref_block = refs[r0 : r0 + ref_chunk].to(device, torch.float32)
                block = block_buffer[: len(query_block) * len(ref_block)].view(len(query_block), len(ref_block))
                torch.mm(query_block, ref_block.T, out=block)
                # Top-k of the block first, then merge with the running top-k: only (n, 2k) is concatenated.
                block_scores, block_indices = block.topk(min(k, block.shape[1]), dim=1)
                merged_scores = torch.cat([scores, block_scores], dim=1)
                merged_indices = torch.cat([indices, block_indices + r0], dim=1)
                scores, position = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
                indices = merged_indices.gather(1, position)
                bar.update(1)
            best_scores[q0 : q0 + query_chunk] = scores.cpu()
            best_indices[q0 : q0 + query_chunk] = indices.cpu()
    return best_scores, best_indices


def shift_offsets(max_shift: float, step: float) -> list[tuple[float, float]]:
    """(dy, dx) grid in thumbnail pixels, |dy|, |dx| <= max_shift in steps of `step`; (0, 0) first."""
    count = int(round(max_shift / step)) if max_shift > 0 else 0
    values = [i * step for i in range(-count, count + 1)]
    grid = [(dy, dx) for dy in values for dx in values if (dy, dx) != (0.0, 0.0)]
    return [(0.0, 0.0)] + grid


def shift_images(thumbs, dy: float, dx: float):
    """(N, H, W) images moved down by dy and right by dx pixels (fractional: bilinear; edges replicated)."""
    if dy == 0 and dx == 0:
        return thumbs
    count, height, width = thumbs.shape
    # grid_sample reads output pixel (y, x) from input (y - dy, x - dx), in [-1, 1] pixel-center units.
    ys = (torch.arange(height, dtype=torch.float32) - dy + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=torch.float32) - dx + 0.5) / width * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1).to(thumbs.device)[None].expand(count, -1, -1, -1)
    moved = F.grid_sample(thumbs[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return moved[:, 0]


def merge_topk(scores, indices, k: int):
    """Per row, the k best distinct indices among candidate (score, index) columns: (scores, indices).

    Rows are (N, C) with C >= k distinct-or-repeated candidates (one block per shift); a reference
    found under several shifts keeps its best score. Rows with fewer than k distinct indices are padded
    with -inf / -1.
    """
    order = scores.argsort(dim=1, descending=True)
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    out_scores = torch.full((len(scores), k), -math.inf, dtype=scores.dtype)
    out_indices = torch.full((len(scores), k), -1, dtype=torch.int64)
    for row, (row_scores, row_indices) in enumerate(zip(scores.tolist(), indices.tolist())):
        seen = {}
        for score, index in zip(row_scores, row_indices):
            if index not in seen:
                seen[index] = score
                if len(seen) == k:
                    break
        out_indices[row, : len(seen)] = torch.tensor(list(seen))
        out_scores[row, : len(seen)] = torch.tensor(list(seen.values()), dtype=scores.dtype)
    return out_scores, out_indices


def _return_free_memory_to_os() -> None:
    """glibc keeps freed blocks of the short-lived per-chunk tensors in fragmented arenas, so without
    this the resident size of a long search creeps up well past the budget; malloc_trim hands the free
    pages back. A no-op where glibc is not the allocator."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def best_matches(
    query_thumbs,
    ref_features,
    *,
    k: int,
    max_shift: float = 0.0,
    shift_step: float = 0.5,
    memory_budget_mb: float = 512,
    device=None,
    progress: bool = False,
):
    """The audit statistic: each query's k nearest references by shift-tolerant NCC, best first.

    The score of (query, reference) is the max NCC over copies of the query moved by every offset of
    `shift_offsets(max_shift, shift_step)` (thumbnail pixels; half pixels are bilinear). Returns
    (scores (Nq, k), indices (Nq, k), shifts (Nq, k, 2) float: the (dy, dx) that gave each score).
    """
    offsets = shift_offsets(max_shift, shift_step)
    # A quarter of the budget holds the shifted copies of a chunk of queries, the rest the score blocks.
    dim = query_thumbs[0].numel() if len(query_thumbs) else 1
    variant_rows = max(len(offsets), int(memory_budget_mb * 2**20 / 4 / (4 * dim)))
    block_budget_mb = memory_budget_mb * 3 / 4
    variant_rows = min(
        variant_rows, chunk_sizes(len(query_thumbs) * len(offsets), len(ref_features), block_budget_mb)[0]
    )
    query_chunk = max(1, variant_rows // len(offsets))
    k = min(k, len(ref_features))
    all_scores, all_indices, all_shifts = [], [], []
    variant_buffer = torch.empty((query_chunk * len(offsets), dim), dtype=torch.float32)  # reused, see ncc_topk
    for start in tqdm(
        range(0, len(query_thumbs), query_chunk), desc="nearest neighbours", unit="chunk", disable=not progress or None
    ):
        chunk = query_thumbs[start : start + query_chunk]
        variants = variant_buffer[: len(offsets) * len(chunk)]
        for shift_index, (dy, dx) in enumerate(offsets):
            variants[shift_index * len(chunk) : (shift_index + 1) * len(chunk)] = standardize(
                shift_images(chunk, dy, dx)
            )
        scores, indices = ncc_topk(variants, ref_features, k, memory_budget_mb=block_budget_mb, device=device)
        # (S * n, k) -> (n, S * k): every shift's candidates side by side for each query.
        scores = scores.reshape(len(offsets), len(chunk), k).permute(1, 0, 2).reshape(len(chunk), -1)
        indices = indices.reshape(len(offsets), len(chunk), k).permute(1, 0, 2).reshape(len(chunk), -1)
        shift_of_column = torch.tensor(offsets, dtype=torch.float32).repeat_interleave(k, dim=0)
        best_scores, best_indices = merge_topk(scores, indices, k)
        # The shift that produced each kept (score, index): the first column holding that pair.
        match = (indices[:, None, :] == best_indices[:, :, None]) & (scores[:, None, :] == best_scores[:, :, None])
        all_shifts.append(shift_of_column[match.float().argmax(dim=2)])
        all_scores.append(best_scores)
        all_indices.append(best_indices)
        _return_free_memory_to_os()
    return torch.cat(all_scores), torch.cat(all_indices), torch.cat(all_shifts)


def calibrate_threshold(holdout_scores, quantile: float) -> float:
    """The `quantile` of the held-out images' best-match scores (linear interpolation)."""
    return float(np.quantile(np.asarray(holdout_scores, dtype=np.float64), quantile))
