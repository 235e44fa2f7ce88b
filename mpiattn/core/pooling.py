"""The sentence-transformers modules after the encoder: Pooling, Dense, Normalize.

    pipe = Pipeline([Pool(("cls",)), Dense(w, b, "tanh"), Normalize()], source="modules.json")
    pooled = pipe(hidden, key_mask)      # (B, S, H), (B, S) -> (B, D)

A prompt (``Pipeline.prompt``) is put before every line by the tokenizer; a Pool with
``include_prompt = False`` leaves its first ``prompt_length`` tokens out.

Each step is the math of its sentence-transformers module (``Pooling._forward_padded``,
``Dense.forward``, ``Normalize.forward``) on NumPy or CuPy arrays, on the rows of whole
sequences whose real tokens are ``key_mask`` (padding on the right, as mpiattn batches
are). Pooling modes concatenate in the order sentence-transformers gives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .backend import get_array_module

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
ACTIVATIONS = ("identity", "tanh", "relu", "sigmoid", "gelu")


@dataclass
class Pool:
    """Pooling over the real tokens: one (B, H) block per mode, concatenated."""

    modes: tuple[str, ...]
    dimension: int | None = None  # the width it was saved for (word_embedding_dimension)
    include_prompt: bool = True  # False: the prompt's tokens are not pooled
    prompt_length: int = 0  # tokens of the prompt put before every line (set by the job)

    def __call__(self, hidden: Any, key_mask: Any) -> Any:
        xp = get_array_module(hidden)
        batch, seq = hidden.shape[:2]
        mask = xp.asarray(key_mask).astype(bool)
        start = first = mask.argmax(axis=1)  # the first real token: 0 on right padding
        if not self.include_prompt and self.prompt_length:  # sentence-transformers'
            mask = mask.copy()  # _exclude_prompt_from_mask (right padding: the first ones)
            mask[:, :self.prompt_length] = False
            first = mask.argmax(axis=1)  # the first token pooled (after the prompt)
        weights = mask.astype(hidden.dtype)[:, :, None]
        rows = xp.arange(batch)
        out = []
        for mode in self.modes:
            if mode == "cls":
                out.append(hidden[rows, first])
            elif mode == "max":
                out.append(xp.where(mask[:, :, None], hidden, -xp.inf).max(axis=1))
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                total = (hidden * weights).sum(axis=1)
                count = xp.maximum(weights.sum(axis=1), 1e-9)
                out.append(total / (count if mode == "mean" else xp.sqrt(count)))
            elif mode == "weightedmean":  # weights 1, 2, ... from the first real token,
                # counted from it even when an excluded prompt's tokens get weight 0
                # (sentence-transformers offsets by the mask before the prompt is cut)
                steps = xp.arange(1, seq + 1, dtype=hidden.dtype)[None, :] - start[:, None]
                w = (mask * steps)[:, :, None].astype(hidden.dtype)
                out.append((hidden * w).sum(axis=1) / xp.maximum(w.sum(axis=1), 1e-9))
            elif mode == "lasttoken":
                flipped = mask[:, ::-1]
                last = seq - 1 - flipped.argmax(axis=1)
                last = xp.where(flipped.any(axis=1), last, seq - 1)
                out.append(hidden[rows, last] * weights[rows, last])
            else:
                raise ValueError(f"pooling mode {mode!r} (built: {', '.join(POOLING_MODES)})")
        return out[0] if len(out) == 1 else xp.concatenate(out, axis=-1)

    def describe(self) -> str:
        cut = ", prompt excluded" if not self.include_prompt and self.prompt_length else ""
        return f"Pooling({'+'.join(self.modes)}{cut})"


@dataclass
class Dense:
    """``activation(x @ w + b)``: w (in, out), b (out,) or None; with ``residual``
    (sentence-transformers' ``use_residual``) plus ``x`` (in == out) or ``x @ residual_w``
    (residual_w (in, out), no bias)."""

    w: Any
    b: Any
    activation: str = "tanh"
    residual: bool = False
    residual_w: Any = None

    def __call__(self, x: Any, key_mask: Any = None) -> Any:
        xp = get_array_module(x)
        y = xp.matmul(x, xp.asarray(self.w, dtype=x.dtype))
        if self.b is not None:
            y = y + xp.asarray(self.b, dtype=x.dtype)
        y = self._activate(xp, y)
        if not self.residual:
            return y
        if self.residual_w is None:
            return y + x
        return y + xp.matmul(x, xp.asarray(self.residual_w, dtype=x.dtype))

    def _activate(self, xp: Any, y: Any) -> Any:
        if self.activation == "tanh":
            return xp.tanh(y)
        if self.activation == "relu":
            return xp.maximum(y, 0)
        if self.activation == "sigmoid":
            return 1 / (1 + xp.exp(-y))
        if self.activation == "gelu":
            from .ops import gelu

            return gelu(y)
        return y

    def describe(self) -> str:
        plus = ", residual" if self.residual else ""
        return f"Dense({self.w.shape[0]}->{self.w.shape[1]}, {self.activation}{plus})"


@dataclass
class Normalize:
    """L2 normalisation of each row (torch's ``F.normalize``: divided by max(norm, 1e-12))."""

    def __call__(self, x: Any, key_mask: Any = None) -> Any:
        xp = get_array_module(x)
        norm = xp.sqrt((x * x).sum(axis=-1, keepdims=True))
        return x / xp.maximum(norm, 1e-12)

    def describe(self) -> str:
        return "Normalize"


@dataclass
class Pipeline:
    """The modules after the Transformer, in order, and where they were read from."""

    steps: list[Any] = field(default_factory=list)
    source: str = ""
    prompt: str = ""  # put before every line (config_sentence_transformers.json prompts)
    prompt_name: str = ""  # its name ("" when none)

    def set_prompt_length(self, tokens: int) -> None:
        """The prompt's length in tokens as sentence-transformers counts it (the prompt
        tokenized alone, without a trailing special token), for ``include_prompt``."""
        for step in self.steps:
            if isinstance(step, Pool):
                step.prompt_length = tokens

    def __call__(self, hidden: Any, key_mask: Any) -> Any:
        """(B, S, H) last hidden states, (B, S) real tokens -> (B, width)."""
        x = self.steps[0](hidden, key_mask)
        for step in self.steps[1:]:
            x = step(x)
        return x

    def width(self, hidden: int) -> int:
        """Width of the result for a model of ``hidden`` units."""
        width = hidden
        for step in self.steps:
            if isinstance(step, Pool):
                width *= len(step.modes)
            elif isinstance(step, Dense):
                width = step.w.shape[1]
        return width

    def describe(self) -> str:
        return " > ".join(["Transformer", *(s.describe() for s in self.steps)])


def default_pipeline() -> Pipeline:
    """mpiattn's own for seeded weights: mean pooling, then Normalize."""
    return Pipeline([Pool(("mean",)), Normalize()],
                    "seeded weights: mpiattn's default (mean pooling, Normalize)")
