"""The cost model's arithmetic, in one place: what ``run`` does, ``bench`` measures and
``plan`` predicts are counted by these functions alone (``analysis.plan`` fits its machine
parameters on top of them; ``commands.benchkit`` reports model FLOP/s with them).

Counts are model FLOPs (a multiply-add is 2), whole layer, no padding; shapes in tokens
``n = batch * seq``, hidden ``H``, feed-forward width ``F``, heads of width ``H / heads``.
"""

from __future__ import annotations

CHECK_ROWS = 2  # rows an ABFT partial carries on top of its n rows: the sum and the |sum|


def blas_threads(cores: float, ranks_on_node: int) -> int:
    """BLAS threads per rank when nobody set them: the node's cores shared by its ranks,
    ``cores // ranks``, at least 1 (``backend.limit_blas_threads`` applies it)."""
    return max(1, int(cores) // max(1, ranks_on_node))


def linear_flops(tokens: int, hidden: int, ffn: int) -> float:
    """One layer's GEMMs outside attention (fused QKV, output projection, the MLP's two)
    on ``tokens`` tokens, all heads: ``2·n·H·3H + 2·n·H·H + 4·n·H·F``."""
    n, h = tokens, hidden
    return float(2 * n * h * 3 * h + 2 * n * h * h + 4 * n * h * ffn)


def attention_flops(batch: int, queries: int, keys: int, heads: int, head_dim: int) -> float:
    """Scores and the weighted sum of values: ``4·b·queries·keys·heads·head_dim``."""
    return float(4 * batch * queries * keys * heads * head_dim)


def layer_flops(batch: int, seq: int, hidden: int, ffn: int) -> dict[str, float]:
    """One whole layer on ``batch`` full sequences of ``seq`` tokens: the attention block
    (QKV, scores, weighted sum, output projection) and the layer (with the MLP)."""
    n = batch * seq
    block = linear_flops(n, hidden, 0) + attention_flops(batch, seq, seq, 1, hidden)
    return {"attention_block": block, "layer": block + 4.0 * n * hidden * ffn}
