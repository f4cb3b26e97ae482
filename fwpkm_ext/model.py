"""Reference decoder-only language model with optional FwPKM and static PKM sublayers.

Architecture (pre-norm):

    h = embed(tokens)
    for each layer i:
        if i in fwpkm_layers: h = h + FwPKM_i(h)          # extra residual sublayer (SPEC eq. 12)
        h = h + Attention_i(RMSNorm(h))                   # RoPE, sliding-window causal attention
        h = h + (PKM_i if i in pkm_layers else SwiGLU_i)(RMSNorm(h))
    logits = RMSNorm(h) @ embed.weight.T                  # tied embeddings

Incremental decoding: ``model(tokens, cache)`` returns ``(logits, cache)``. The cache holds, per
layer, the keys/values of the last ``window`` positions (so its size is constant with sliding
windows) and, per FwPKM layer, the fast-weight state carried with ``flush=False``. Feeding a
sequence in any split gives the logits of one full forward.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .layers import FwPKM, PKM, RMSNorm
from .state import MemoryState

__all__ = ["LMConfig", "LM", "LMCache", "RMSNorm", "PRESETS"]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclass
class LMConfig:
    """Hyper-parameters of :class:`LM`. Saved as JSON next to every checkpoint."""

    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: Optional[int] = None  # None: 8/3 * dim rounded up to a multiple of 64
    window: Optional[int] = 512  # sliding attention window (keys per query); None or 0 = full
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # FwPKM sublayers (extra residual sublayer before attention of these layers, 0-based)
    fwpkm_layers: List[int] = field(default_factory=list)
    fwpkm_n_subkeys: int = 512
    fwpkm_k_dim: int = 512
    fwpkm_v_dim: int = 512
    fwpkm_heads: int = 1
    fwpkm_topk: int = 8
    fwpkm_chunk_size: int = 512
    fwpkm_lookahead: int = 1
    fwpkm_lr: float = 1.0
    fwpkm_addr_loss_weight: float = 1.0
    # initial fast-weight tables are drawn from this seed (not from the global RNG), so a
    # checkpoint need not store them: they are regenerated exactly on load
    fwpkm_init_seed: int = 0
    # width of a depthwise causal convolution over the hidden states feeding each FwPKM
    # sublayer (input = h + conv(h)); 0 = off (the paper). With it, the memory's query at a
    # token sees the few tokens before it (e.g. a needle's ID before "is"). See docs/RESULTS.md.
    fwpkm_short_conv: int = 0
    # SPEC "Extensions beyond the paper" (defaults = the paper's layer); see FwPKM and
    # docs/RESULTS.md for what each one does to retrieval
    fwpkm_query_norm: str = "none"          # none | batch | zscore | l2
    fwpkm_init_values: str = "random"       # random (paper) | zero
    fwpkm_learn_init_keys: bool = False     # initial keys trained by the outer optimizer
    fwpkm_carry_keys: bool = False          # final keys of a training step start the next
    fwpkm_gate_bias: Optional[float] = None  # initial bias of the gate projection
    # static PKM replacing the MLP of these layers
    pkm_layers: List[int] = field(default_factory=list)
    pkm_n_subkeys: int = 512
    pkm_k_dim: int = 512
    pkm_v_dim: Optional[int] = None
    pkm_heads: int = 4
    pkm_topk: int = 32

    def __post_init__(self) -> None:
        self.fwpkm_layers = sorted(int(i) for i in self.fwpkm_layers)
        self.pkm_layers = sorted(int(i) for i in self.pkm_layers)
        if self.window == 0:
            self.window = None
        self.validate()

    # -- checks ---------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid LMConfig: {msg}")

        need(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        need(self.n_layers > 0, f"n_layers must be positive, got {self.n_layers}")
        need(self.n_heads > 0 and self.dim % self.n_heads == 0,
             f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        need((self.dim // self.n_heads) % 2 == 0, "head dim must be even (RoPE)")
        need(self.window is None or self.window > 0, f"window must be positive or None, got {self.window}")
        need(self.fwpkm_short_conv >= 0,
             f"fwpkm_short_conv must be >= 0 (0 = off), got {self.fwpkm_short_conv}")
        need(self.fwpkm_query_norm in ("none", "batch", "zscore", "l2"),
             f"fwpkm_query_norm must be none, batch, zscore or l2, got {self.fwpkm_query_norm!r}")
        need(self.fwpkm_init_values in ("random", "zero"),
             f"fwpkm_init_values must be random or zero, got {self.fwpkm_init_values!r}")
        need(not (self.fwpkm_learn_init_keys and self.fwpkm_carry_keys),
             "fwpkm_learn_init_keys and fwpkm_carry_keys exclude each other")
        for name in ("fwpkm_layers", "pkm_layers"):
            layers = getattr(self, name)
            need(len(set(layers)) == len(layers), f"{name} has duplicates: {layers}")
            need(all(0 <= i < self.n_layers for i in layers),
                 f"{name} {layers} out of range for n_layers={self.n_layers}")
        if self.fwpkm_layers:
            need(self.fwpkm_k_dim % 2 == 0, "fwpkm_k_dim must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return int(self.mlp_hidden)
        return int(64 * math.ceil(8 * self.dim / 3 / 64))

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown LMConfig fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LMConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str) -> "LMConfig":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_json(f.read())

    def replace(self, **kw: Any) -> "LMConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        d = dict(PRESETS[name])
        d.update(overrides)
        return cls.from_dict(d)


PRESETS: Dict[str, Dict[str, Any]] = {
    # trains on a CPU in minutes
    "tiny": dict(
        vocab_size=8192, dim=256, n_layers=4, n_heads=4, window=512,
        fwpkm_layers=[1], fwpkm_n_subkeys=128, fwpkm_k_dim=128, fwpkm_v_dim=256,
        fwpkm_heads=1, fwpkm_topk=8, fwpkm_chunk_size=512,
    ),
    # same model without the memory (baseline)
    "tiny-nomem": dict(vocab_size=8192, dim=256, n_layers=4, n_heads=4, window=512),
    # the paper's main configuration (12 layers, dim 768, FwPKM at layers 2 and 10)
    "paper": dict(
        vocab_size=8192, dim=768, n_layers=12, n_heads=12, window=512,
        fwpkm_layers=[2, 10], fwpkm_n_subkeys=512, fwpkm_k_dim=512, fwpkm_v_dim=512,
        fwpkm_heads=1, fwpkm_topk=8, fwpkm_chunk_size=512,
    ),
    # its baselines: no memory, and static PKM replacing the MLP of the same layers
    "paper-nomem": dict(vocab_size=8192, dim=768, n_layers=12, n_heads=12, window=512),
    "paper-pkm": dict(
        vocab_size=8192, dim=768, n_layers=12, n_heads=12, window=512,
        pkm_layers=[2, 10], pkm_n_subkeys=512, pkm_k_dim=512, pkm_heads=4, pkm_topk=32,
    ),
}


def config_overrides(spec: Optional[str]) -> Dict[str, Any]:
    """LMConfig overrides from a `--config` value: inline JSON object or a JSON file path."""
    if not spec:
        return {}
    s = spec.strip()
    if s.startswith("{"):
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config is not valid JSON: {e}") from None
    else:
        if not os.path.isfile(s):
            raise FileNotFoundError(f"--config file not found: {s}")
        with open(s, "r", encoding="utf-8") as f:
            d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError("--config must be a JSON object")
    return d



# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def _rope(x: torch.Tensor, pos0: int, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of ``x`` (B, H, T, D) at positions pos0..pos0+T-1."""
    T, D = x.shape[-2], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D))
    pos = torch.arange(pos0, pos0 + T, device=x.device, dtype=torch.float64)
    ang = torch.outer(pos, inv)  # float64: exact for long positions
    cos = ang.cos().to(torch.float32)
    sin = ang.sin().to(torch.float32)
    xf = x.float()
    x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q0: int, k0: int,
                       window: Optional[int], block: int = 128) -> torch.Tensor:
    """Causal (sliding-window) attention with absolute positions.

    q: (B, H, Tq, D) at positions q0..q0+Tq-1; k, v: (B, H, Tk, D) at k0..k0+Tk-1, with
    k0 + Tk == q0 + Tq (the keys end with the last query). Query t sees keys s with
    t - window < s <= t (all s <= t when ``window`` is None). Queries are processed in blocks so
    the cost is O(T * window), each block through ``scaled_dot_product_attention`` with a mask.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    assert k0 + Tk == q0 + Tq, "keys must end at the last query"
    if window is not None:
        block = max(1, min(block, window))
    outs = []
    for s in range(0, Tq, block):
        e = min(s + block, Tq)
        qa, qb = q0 + s, q0 + e
        ka = k0 if window is None else max(k0, qa - window + 1)
        qpos = torch.arange(qa, qb, device=q.device)
        kpos = torch.arange(ka, qb, device=q.device)
        diff = qpos[:, None] - kpos[None, :]
        mask = diff >= 0
        if window is not None:
            mask = mask & (diff < window)
        outs.append(F.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, ka - k0: qb - k0], v[:, :, ka - k0: qb - k0], attn_mask=mask))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.window = cfg.window
        self.theta = cfg.rope_theta
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, pos0: int,
                kv: Optional[Tuple[torch.Tensor, torch.Tensor]], want_kv: bool):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = _rope(q, pos0, self.theta)
        k = _rope(k, pos0, self.theta)
        k0 = pos0
        if kv is not None and kv[0].shape[2] > 0:
            pk, pv = kv
            k0 = pos0 - pk.shape[2]
            k = torch.cat([pk.to(k.dtype), k], dim=2)
            v = torch.cat([pv.to(v.dtype), v], dim=2)
        y = windowed_attention(q, k, v, pos0, k0, self.window)
        new_kv = None
        if want_kv:
            if self.window is not None and k.shape[2] > self.window:
                k, v = k[:, :, -self.window:], v[:, :, -self.window:]
            new_kv = (k.detach(), v.detach())
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), new_kv


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, idx: int):
        super().__init__()
        self.idx = idx
        self.fwpkm: Optional[nn.Module] = None
        if idx in cfg.fwpkm_layers:
            self.fwpkm = FwPKM(
                cfg.dim, n_subkeys=cfg.fwpkm_n_subkeys, mem_k_dim=cfg.fwpkm_k_dim,
                mem_v_dim=cfg.fwpkm_v_dim, heads=cfg.fwpkm_heads, topk=cfg.fwpkm_topk,
                chunk_size=cfg.fwpkm_chunk_size, lookahead=cfg.fwpkm_lookahead,
                lr=cfg.fwpkm_lr, addr_loss_weight=cfg.fwpkm_addr_loss_weight,
                query_norm=cfg.fwpkm_query_norm, init_values=cfg.fwpkm_init_values,
                learn_init_keys=bool(cfg.fwpkm_learn_init_keys), carry_keys=bool(cfg.fwpkm_carry_keys),
                gate_bias=cfg.fwpkm_gate_bias)
        self.mem_conv: Optional[nn.Conv1d] = None
        if self.fwpkm is not None and cfg.fwpkm_short_conv > 0:
            self.mem_conv = nn.Conv1d(cfg.dim, cfg.dim, cfg.fwpkm_short_conv, groups=cfg.dim,
                                      bias=False)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if idx in cfg.pkm_layers:
            self.mlp = PKM(cfg.dim, n_subkeys=cfg.pkm_n_subkeys, k_dim=cfg.pkm_k_dim,
                           v_dim=cfg.pkm_v_dim, heads=cfg.pkm_heads, topk=cfg.pkm_topk)
            self.is_pkm = True
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim)
            self.is_pkm = False

    def forward(self, h, pos0, kv, mem_state, want_cache: bool, inplace_memory: bool = False,
                conv_tail: Optional[torch.Tensor] = None):
        new_state = new_tail = None
        if self.fwpkm is not None:
            x = h
            if self.mem_conv is not None:
                x, new_tail = self._short_conv(h, conv_tail)
            inplace = inplace_memory and mem_state is not None and not torch.is_grad_enabled()
            # without a cache the final memory is dropped: do not build its value table
            y, new_state = self.fwpkm(x, state=mem_state, flush=not want_cache, inplace=inplace,
                                      return_state=want_cache)
            h = h + y
        a, new_kv = self.attn(self.attn_norm(h), pos0, kv, want_cache)
        h = h + a
        h = h + self.mlp(self.mlp_norm(h))
        return h, new_kv, new_state, new_tail

    def _short_conv(self, h: torch.Tensor, tail: Optional[torch.Tensor]):
        """h + causal depthwise conv(h); ``tail``: the previous call's last width-1 inputs (zeros
        at the start of a stream). Returns the input of the memory and the new tail."""
        w = self.mem_conv.kernel_size[0]
        if tail is None:
            tail = h.new_zeros(h.shape[0], w - 1, h.shape[2])
        full = torch.cat([tail.to(h.dtype), h], dim=1)
        # the depthwise conv as a 2-D conv on (B, dim, 1, T) in channels-last layout: that is the
        # (B, T, dim) tensor itself, so neither direction transposes it (half the time of
        # Conv1d on the transposed input); same weights, same result up to rounding
        c = self.mem_conv
        x4 = full.unsqueeze(1).permute(0, 3, 1, 2)
        w4 = c.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x4, w4, c.bias, groups=c.groups).permute(0, 2, 3, 1).squeeze(1)
        return h + y, full[:, full.shape[1] - (w - 1):]


# --------------------------------------------------------------------------------------------
# Cache and model
# --------------------------------------------------------------------------------------------
@dataclass
class LMCache:
    """Decoding state: position of the next token, per-layer K/V of the last ``window``
    positions (post-RoPE, (B, H, <=window, head_dim)), per-FwPKM-layer memory state."""

    pos: int = 0
    kv: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    mem: Dict[int, MemoryState] = field(default_factory=dict)
    # per FwPKM layer with a short convolution: its last width-1 inputs, (B, width-1, dim)
    conv: Dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, model: "LM", batch_size: Optional[int] = None, *,
              chunk_size: Optional[int] = None, mem: Optional[Dict[int, MemoryState]] = None
              ) -> "LMCache":
        """A cache that has read nothing. Each FwPKM layer starts from its state in ``mem`` or
        from a fresh one: ``batch_size=None`` one memory shared by the batch (what ``cache=None``
        gives), ``B`` one memory per sequence; ``chunk_size`` its update window (default: the
        layer's)."""
        mem = dict(mem or {})
        for i, b in enumerate(model.blocks):
            if b.fwpkm is not None and i not in mem:
                mem[i] = b.fwpkm.init_state(batch_size, chunk_size=chunk_size)
        return cls(pos=0, kv=[None] * model.cfg.n_layers, mem=mem)

    def nbytes(self) -> int:
        """Bytes of the attention keys/values (the memory states: ``MemoryState.nbytes``)."""
        return sum(t.numel() * t.element_size() for p in self.kv if p is not None for t in p)

    def select(self, index: Union[int, slice]) -> "LMCache":
        """The cache of the sequences ``index`` of the batch (an int: that sequence, as a batch of
        one)."""
        sl = slice(index, index + 1) if isinstance(index, int) else index
        return LMCache(pos=self.pos, kv=[None if p is None else (p[0][sl], p[1][sl]) for p in self.kv],
                       mem={i: st.select(index) for i, st in self.mem.items()},
                       conv={i: t[sl] for i, t in self.conv.items()})

    def to(self, device: Union[str, torch.device]) -> "LMCache":
        """The same cache on another device."""
        return LMCache(pos=self.pos,
                       kv=[None if p is None else (p[0].to(device), p[1].to(device)) for p in self.kv],
                       mem={i: st.to(device) for i, st in self.mem.items()},
                       conv={i: t.to(device) for i, t in self.conv.items()})

    def to_payload(self) -> Dict[str, Any]:
        """The cache as plain data (tensors detached and on the CPU; memory states as
        ``MemoryState.to_payload``): what a stream snapshot holds."""
        return {"pos": int(self.pos),
                "kv": [None if p is None else [p[0].detach().cpu(), p[1].detach().cpu()]
                       for p in self.kv],
                "mem": {int(i): st.to_payload() for i, st in self.mem.items()},
                "conv": {int(i): t.detach().cpu() for i, t in self.conv.items()}}

    @classmethod
    def from_payload(cls, payload: Dict[str, Any], model: "LM", where: str = "payload") -> "LMCache":
        """The cache of a ``to_payload`` dict (on the CPU), checked against ``model``: one
        attention entry per layer, one memory state per FwPKM layer (of that layer's
        configuration, its update window aside), and a convolution tail per FwPKM layer with a
        short convolution once something was read. A ValueError starting with ``where``."""
        cfg = model.cfg
        pos = int(payload["pos"])
        kv = [None if p is None else (p[0], p[1]) for p in payload["kv"]]
        if len(kv) != cfg.n_layers:
            raise ValueError(f"{where}: holds {len(kv)} attention caches, the model has "
                             f"{cfg.n_layers} layers")
        mem = {int(i): MemoryState.from_payload(d, where=f"{where}: memory state of layer {i}")
               for i, d in payload["mem"].items()}
        if sorted(mem) != list(cfg.fwpkm_layers):
            raise ValueError(f"{where}: memory states for layers {sorted(mem)}, the model has "
                             f"FwPKM layers {cfg.fwpkm_layers}")
        for i, st in mem.items():
            own = model.blocks[i].fwpkm.config
            diff = dataclasses.replace(st.config, chunk_size=own.chunk_size).diff(own)
            if diff:
                raise ValueError(f"{where}: the memory state of layer {i} belongs to another "
                                 f"memory configuration (state vs layer: {diff})")
        conv = {int(i): t for i, t in (payload.get("conv") or {}).items()}
        # a cache that has read something holds one tail per FwPKM layer with a convolution
        want = list(cfg.fwpkm_layers) if cfg.fwpkm_short_conv and pos > 0 else []
        if sorted(conv) != want:
            raise ValueError(f"{where}: short-convolution tails for layers {sorted(conv)}, the "
                             f"model needs {want}")
        return cls(pos=pos, kv=kv, mem=mem, conv=conv)


class LM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for b in self.blocks:
            nn.init.normal_(b.attn.qkv.weight, std=std)
            nn.init.normal_(b.attn.proj.weight, std=out_std)
            if not b.is_pkm:
                nn.init.normal_(b.mlp.gate_up.weight, std=std)
                nn.init.normal_(b.mlp.down.weight, std=out_std)
        own = self.state_dict()
        for k, t in self.seeded_fast_weight_tables().items():
            own[k].copy_(t)

    def seeded_fast_weight_tables(self) -> Dict[str, torch.Tensor]:
        """The initial FwPKM tables (SPEC init) drawn on the CPU from ``cfg.fwpkm_init_seed``
        and the layer index: the same on every device and run, so checkpoints can omit them."""
        out: Dict[str, torch.Tensor] = {}
        for i, b in enumerate(self.blocks):
            if b.fwpkm is None:
                continue
            c = b.fwpkm.config
            g = torch.Generator().manual_seed(int(self.cfg.fwpkm_init_seed) * 1_000_003 + i)
            bound = 1.0 / math.sqrt(c.key_dim)
            keys = torch.rand(tuple(b.fwpkm.init_keys.shape), generator=g, dtype=torch.float64)
            out[f"blocks.{i}.fwpkm.init_keys"] = (keys * 2 - 1).mul_(bound).float()
            values = torch.randn(tuple(b.fwpkm.init_values.shape), generator=g) / math.sqrt(c.value_dim)
            if b.fwpkm.init_values_mode == "zero":
                values.zero_()  # same draws as the random table, so the keys stay comparable
            out[f"blocks.{i}.fwpkm.init_values"] = values
        return out

    def init_cache(self, batch_size: Optional[int] = None) -> LMCache:
        """An empty cache. ``batch_size=None``: FwPKM layers use one memory shared by the batch
        (the training setup, what ``cache=None`` gives); ``batch_size=B``: one memory per
        sequence (independent streams)."""
        return LMCache.empty(self, batch_size)

    def forward(self, tokens: torch.Tensor, cache: Optional[LMCache] = None,
                use_cache: bool = True,
                inplace_memory: bool = False) -> Tuple[torch.Tensor, Optional[LMCache]]:
        """tokens (B, T) int64 -> (logits (B, T, vocab) float32, cache).

        ``cache=None`` starts a new stream (fresh FwPKM memory shared by the batch).
        ``use_cache=False`` is the training call: FwPKM windows are flushed at the end (one
        call is one document/sequence), no cache is built, and ``None`` is returned for it.
        ``inplace_memory=True`` (inference without autograd) writes the cache's FwPKM tables in
        place instead of copying them; the given cache must not be used again.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        if cache is not None and not use_cache:
            raise ValueError("a cache was given with use_cache=False")
        pos0 = cache.pos if cache is not None else 0
        h = self.embed(tokens)
        new_cache = LMCache(pos=pos0 + tokens.shape[1]) if use_cache else None
        for i, b in enumerate(self.blocks):
            kv = cache.kv[i] if cache is not None and i < len(cache.kv) else None
            st = cache.mem.get(i) if cache is not None else None
            tail = cache.conv.get(i) if cache is not None else None
            h, new_kv, new_st, new_tail = b(h, pos0, kv, st, use_cache, inplace_memory, tail)
            if new_cache is not None:
                new_cache.kv.append(new_kv)
                if b.fwpkm is not None:
                    new_cache.mem[i] = new_st
                if new_tail is not None:
                    new_cache.conv[i] = new_tail
        h = self.norm(h)
        logits = F.linear(h, self.embed.weight).float()
        return logits, new_cache

    # -- helpers --------------------------------------------------------------------------
    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy of a training forward (``use_cache=False``)."""
        logits, _ = self(inputs, use_cache=False)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def num_params(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int,
                 cache: Optional[LMCache] = None, eos_id: Optional[int] = None,
                 temperature: float = 0.0) -> Tuple[torch.Tensor, LMCache]:
        """Greedy (temperature 0) or sampled continuation of ``tokens`` (B, T)."""
        logits, cache = self(tokens, cache)
        out = []
        for _ in range(max_new_tokens):
            last = logits[:, -1]
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(last / temperature, -1), 1)
            else:
                nxt = last.argmax(-1, keepdim=True)
            out.append(nxt)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
            logits, cache = self(nxt, cache)
        gen = torch.cat(out, dim=1) if out else tokens.new_zeros((tokens.shape[0], 0))
        return gen, cache

    # -- checkpoints ----------------------------------------------------------------------
    def save_pretrained(self, out_dir: str, dtype: Optional[torch.dtype] = None) -> None:
        """Writes ``model.safetensors`` and ``config.json`` into ``out_dir``.

        Initial fast-weight tables that equal the seeded ones (``cfg.fwpkm_init_seed``) are not
        written (they are most of the bytes and are regenerated on load). ``dtype`` (e.g.
        ``torch.float16``) stores the trained weights in that precision, for a smaller file;
        loading casts them back to the model's dtype."""
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
        os.makedirs(out_dir, exist_ok=True)
        seeded = self.seeded_fast_weight_tables()
        state = {}
        for k, v in self.state_dict().items():
            v = v.detach().cpu()
            if k in seeded:
                if torch.equal(v, seeded[k]):
                    continue
            elif dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            state[k] = v.contiguous()
        # tied embeddings: one tensor only. Write then rename, so an interrupted save never
        # leaves a truncated checkpoint.
        path = os.path.join(out_dir, "model.safetensors")
        save_file(state, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
        cpath = os.path.join(out_dir, "config.json")
        self.cfg.save(cpath + ".tmp")
        os.replace(cpath + ".tmp", cpath)

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, map_location: str = "cpu") -> "LM":
        cfg = LMConfig.load(os.path.join(ckpt_dir, "config.json"))
        model = cls(cfg)
        # a fresh model already holds the seeded tables: no need to draw them again
        model.load_weights(os.path.join(ckpt_dir, "model.safetensors"), map_location,
                           _tables_seeded=True)
        # inference mode, as transformers does: query batch norm (if any) uses its running
        # statistics; call .train() to fine-tune
        return model.eval()

    def load_weights(self, path: str, map_location: str = "cpu", *,
                     _tables_seeded: bool = False) -> None:
        state = load_file(path, device=map_location)
        own = self.state_dict()
        # absent initial tables are the seeded ones (see save_pretrained)
        if any(k.endswith((".init_keys", ".init_values")) and k not in state for k in own):
            seeded = (({k: own[k] for k in own if k.endswith((".init_keys", ".init_values"))})
                      if _tables_seeded else self.seeded_fast_weight_tables())
            state.update({k: v.to(map_location) for k, v in seeded.items() if k not in state})
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        if missing or unexpected or bad:
            parts = []
            if missing:
                parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
            if bad:
                parts.append("shape mismatch " + ", ".join(
                    f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in bad[:5]))
            raise ValueError(f"checkpoint {path} does not match this model config: "
                             + "; ".join(parts))
        self.load_state_dict(state)
