"""nn.Modules: the FwPKM sublayer (SPEC "The layer around the memory"), the static PKM baseline
and the optimizer-group helper."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _alloc, recurrence, functional, ops
from .state import MemoryConfig, MemoryState


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), w initialised to 0 (SPEC)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1 + self.weight.to(y.dtype))).to(x.dtype)


def zscore(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardise over features (SPEC: z-score of the value projection, eps 1e-6):
    (x - mean) / sqrt(biased variance + eps), which is exactly layer_norm without an affine
    map; the fused kernel is ~5x faster forward + backward than the six ops written out."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)


QUERY_NORMS = ("none", "batch", "zscore", "l2")
INIT_VALUES = ("random", "zero")


def _positive_int(name: str, val) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"{name}: expected a positive int, got {val!r}")
    return val


def _check_x(x, dim: int, weight: Tensor) -> None:
    """Hidden states (B, T, dim) of the module's dtype (any float dtype under autocast)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x: expected shape (B, T, {dim}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating tensor, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x: expected device {weight.device} like the module, got {x.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x: expected dtype {weight.dtype} like the module's weights (or run under "
                        f"torch.autocast), got {x.dtype}")


class FwPKM(nn.Module):
    """Fast-weight Product Key Memory sublayer.

    y, state = layer(x, state=None, flush=True): x (B, T, dim) -> y (B, T, dim), the sublayer output
    to add to the residual stream. The key/value tables are rewritten by chunk-wise gradient descent
    while reading (every `chunk_size` tokens). `state=None` starts from the layer's initial tables
    as one memory shared by the batch and treats the call as a whole document (training);
    `init_state(batch_size)` gives one memory per sequence for streaming/serving. With
    `flush=False` the tokens of an unfinished window stay pending in the returned state.

    The initial tables are buffers: the outer optimizer never trains them (see `param_groups`).
    """

    def __init__(self, dim: int, *, n_subkeys: int = 512, mem_k_dim: int = 512, mem_v_dim: int = 512,
                 heads: int = 1, topk: int = 8, chunk_size: int = 512, lookahead: int = 1,
                 lr: float = 1.0, addr_loss_weight: float = 1.0, score: str = "idw", eps: float = 1e-3,
                 query_norm: str = "none", init_values: str = "random", learn_init_keys: bool = False,
                 carry_keys: bool = False, gate_bias: Optional[float] = None, nonfinite: str = "raise"):
        super().__init__()
        if nonfinite not in functional.NONFINITE:
            raise ValueError(f"nonfinite: expected one of {functional.NONFINITE}, got {nonfinite!r}")
        # what a token whose q, v or g is NaN/Inf does (SPEC "Inputs that must never reach the
        # tables"): "raise" before anything is written, or "skip" it (no write, counted)
        self.nonfinite = nonfinite
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"query_norm: expected one of {QUERY_NORMS}, got {query_norm!r}")
        if init_values not in INIT_VALUES:
            raise ValueError(f"init_values: expected one of {INIT_VALUES}, got {init_values!r}")
        for name, val in (("learn_init_keys", learn_init_keys), ("carry_keys", carry_keys)):
            if not isinstance(val, bool):
                raise TypeError(f"{name}: expected a bool, got {type(val).__name__}")
        if learn_init_keys and carry_keys:
            raise ValueError("carry_keys: cannot be combined with learn_init_keys (the initial keys are "
                             "either trained by the outer optimizer or carried from the last step)")
        if gate_bias is not None and (isinstance(gate_bias, bool) or not isinstance(gate_bias, (int, float))
                                      or not math.isfinite(gate_bias)):
            raise ValueError(f"gate_bias: must be a finite number or None, got {gate_bias!r}")
        for name, val in (("dim", dim), ("n_subkeys", n_subkeys), ("mem_k_dim", mem_k_dim),
                          ("mem_v_dim", mem_v_dim), ("heads", heads), ("topk", topk),
                          ("chunk_size", chunk_size)):
            _positive_int(name, val)
        if mem_k_dim % 2:
            raise ValueError(f"mem_k_dim: must be even, got {mem_k_dim}")
        functional.check_config(topk, chunk_size, lookahead, lr, addr_loss_weight, n_subkeys, score, eps)
        self.dim = dim
        self.config = MemoryConfig(n_subkeys=n_subkeys, key_dim=mem_k_dim, value_dim=mem_v_dim,
                                   heads=heads, topk=topk, chunk_size=chunk_size, lookahead=lookahead,
                                   lr=float(lr), addr_loss_weight=float(addr_loss_weight), score=score,
                                   eps=float(eps))
        # extensions beyond the paper (SPEC "Extensions"); the defaults are the paper's layer
        self.query_norm, self.init_values_mode = query_norm, init_values
        self.learn_init_keys, self.carry_keys = learn_init_keys, carry_keys
        self.norm_in = RMSNorm(dim)
        self.to_q = nn.Linear(dim, heads * mem_k_dim, bias=True)
        # per-dimension batch normalisation of the queries (Lample et al.): running statistics at
        # inference. No affine part: a learned shift could rebuild the common component.
        self.q_bn = nn.BatchNorm1d(heads * mem_k_dim, affine=False, momentum=0.1) \
            if query_norm == "batch" else None
        self.to_v = nn.Linear(dim, mem_v_dim, bias=True)
        self.to_g = nn.Linear(dim, 1, bias=True)
        if gate_bias is not None:
            with torch.no_grad():
                self.to_g.bias.fill_(float(gate_bias))
        self.norm_out = RMSNorm(mem_v_dim)
        self.to_out = nn.Linear(mem_v_dim, dim, bias=True)
        bound = 1.0 / math.sqrt(mem_k_dim)
        keys = torch.empty(heads, 2, n_subkeys, mem_k_dim // 2).uniform_(-bound, bound)
        if learn_init_keys:
            self.init_keys = nn.Parameter(keys)
        else:
            self.register_buffer("init_keys", keys)
        values = torch.zeros(n_subkeys * n_subkeys, mem_v_dim) if init_values == "zero" else \
            torch.randn(n_subkeys * n_subkeys, mem_v_dim) / math.sqrt(mem_v_dim)
        self.register_buffer("init_values", values)

    def _apply(self, fn, recurse=True):
        # Fast weights stay float32 (or float64) whatever dtype the model is cast to: keep the
        # device move of `fn`, undo its cast to a reduced precision.
        old = {name: getattr(self, name) for name in ("init_keys", "init_values")}
        out = super()._apply(fn, recurse)
        for name, t in old.items():
            new = getattr(self, name)
            if new.dtype not in (torch.float32, torch.float64):
                if isinstance(new, nn.Parameter):  # learned initial keys
                    new.data = t.data.to(device=new.device)
                else:
                    self._buffers[name] = t.to(device=new.device)
        return out

    # ---------------------------------------------------------------------------------------------
    def init_state(self, batch_size: Optional[int] = None, chunk_size: Optional[int] = None) -> MemoryState:
        """A fresh state from the initial tables: shared (None) or one memory per sequence.

        `chunk_size` overrides the update window for this state only (e.g. one update per whole
        read when evaluating long documents); everything else follows the layer."""
        config = self.config
        if chunk_size is not None:
            _positive_int("chunk_size", chunk_size)
            config = replace(config, chunk_size=chunk_size)
        if batch_size is None:
            keys, values, per_seq = self.init_keys.unsqueeze(0).clone(), _alloc.clone(self.init_values.unsqueeze(0)), False
        else:
            _positive_int("batch_size", batch_size)
            keys = self.init_keys.unsqueeze(0).repeat(batch_size, 1, 1, 1, 1)
            values = _alloc.clone(self.init_values.unsqueeze(0).expand(batch_size, -1, -1))
            per_seq = True
        return MemoryState(config=config, keys=keys, values=values, per_sequence=per_seq)

    def flush(self, state: MemoryState, inplace: bool = False) -> MemoryState:
        """Write the pending tokens of the unfinished window (`inplace`: see `forward`)."""
        self._check_state(state)
        return functional.flush_state(state, inplace=inplace)

    def load_state(self, path, device=None) -> MemoryState:
        """Load a state saved with `state.save(path)`, checked against this layer's configuration
        (its update window may differ, see `init_state`)."""
        state = MemoryState.load(path, None, device=device if device is not None else self.init_values.device)
        self._check_state(state)
        return state

    def _check_state(self, state) -> None:
        if not isinstance(state, MemoryState):
            raise TypeError(f"state: expected a MemoryState, got {type(state).__name__}")
        diff = replace(state.config, chunk_size=self.config.chunk_size).diff(self.config)
        if diff:
            raise ValueError(f"state: belongs to another memory configuration (state vs layer: {diff})")

    # ---------------------------------------------------------------------------------------------
    def project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q (B,T,H,dk), v (B,T,dv) z-scored, g (B,T) in (0,1) from hidden states x (B,T,dim)."""
        _check_x(x, self.dim, self.to_q.weight)
        h = self.norm_in(x)
        B, T, _ = x.shape
        q = self._normalize_queries(self.to_q(h)).view(B, T, self.config.heads, self.config.key_dim)
        v = zscore(self.to_v(h))
        g = torch.sigmoid(self.to_g(h)).squeeze(-1)
        return q, v, g

    def _normalize_queries(self, q: Tensor) -> Tensor:
        """SPEC "Extensions": query normalisation per head (batch) or per query half (zscore, l2)."""
        if self.query_norm == "none":
            return q
        if self.query_norm == "batch":
            # statistics over every token of the call in training, running ones in eval mode
            flat = q.reshape(-1, q.shape[-1])
            if flat.shape[0] == 0 or (self.training and flat.shape[0] == 1):
                # nothing (or a single token) to take batch statistics of: use the running ones
                return torch.nn.functional.batch_norm(
                    flat, self.q_bn.running_mean, self.q_bn.running_var, training=False,
                    eps=self.q_bn.eps).view_as(q)
            return self.q_bn(flat).view_as(q)
        c = self.config
        halves = q.reshape(*q.shape[:-1], c.heads, 2, c.key_dim // 2)
        if self.query_norm == "zscore":
            halves = zscore(halves)
        else:  # l2: unit norm per half
            halves = halves * torch.rsqrt(halves.pow(2).sum(-1, keepdim=True) + 1e-12)
        return halves.reshape(q.shape)

    def forward(self, x: Tensor, state: Optional[MemoryState] = None, flush: bool = True,
                mask: Optional[Tensor] = None, inplace: bool = False, nonfinite: Optional[str] = None,
                return_state: bool = True) -> Tuple[Tensor, Optional[MemoryState]]:
        """x (B, T, dim) -> (y, new_state). `mask` (B, T): tokens with mask <= 0 are read but do not
        write. `inplace=True` (inference under torch.no_grad only) updates the given state's
        tables in place instead of copying them: the fast streaming path; the old state object
        must not be reused. `nonfinite` overrides the layer's setting for this call (see
        `functional.memory_step`). `return_state=False` returns (y, None) and skips building the
        new value table (a training step that does not keep the memory)."""
        q, v, g = self.project(x)
        nonfinite = self.nonfinite if nonfinite is None else nonfinite
        return_state = return_state or (self.carry_keys and self.training)
        if state is None:
            if inplace:
                raise ValueError("inplace: needs an explicit state (layer.init_state(...)); the "
                                 "initial tables are never written")
            # whole document from the initial tables; the op never modifies its inputs
            state = MemoryState(config=self.config, keys=self.init_keys.unsqueeze(0),
                                values=self.init_values.unsqueeze(0), per_sequence=False)
            fresh = True
        else:
            self._check_state(state)
            fresh = False
        vhat, state = functional.memory_step(q, v, g, state, mask=mask, flush=flush, inplace=inplace,
                                             nonfinite=nonfinite, return_state=return_state)
        if fresh and self.carry_keys and self.training:
            # carried memory (SPEC "Extensions"): the detached final keys of this training call
            # become the initial keys of the next, so they fit the query distribution over time
            with torch.no_grad():
                self.init_keys.copy_(state.keys.detach().mean(0).to(self.init_keys.dtype))
        gt = g.unsqueeze(-1)
        # g * vhat + (1 - g) * v as one op (a third of the passes over (B, T, dv) of the four
        # ops, forward and backward; the same up to rounding)
        o = torch.lerp(v, vhat.to(v.dtype), gt.to(v.dtype))  # lerp wants one dtype (autocast)
        return self.to_out(self.norm_out(o)), state

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={self.dim}, n_subkeys={c.n_subkeys}, mem_k_dim={c.key_dim}, mem_v_dim={c.value_dim}, "
                f"heads={c.heads}, topk={c.topk}, chunk_size={c.chunk_size}, lookahead={c.lookahead}")


class PKM(nn.Module):
    """Static product-key memory (Lample et al. 2019), the paper's baseline: dot-product sub-scores,
    per-head softmax over the top-k, value table trained by the outer optimizer, same top-k and
    gather kernels as FwPKM."""

    def __init__(self, dim: int, *, n_subkeys: int = 512, k_dim: int = 512, v_dim: Optional[int] = None,
                 heads: int = 4, topk: int = 32):
        super().__init__()
        for name, val in (("dim", dim), ("n_subkeys", n_subkeys), ("k_dim", k_dim), ("heads", heads),
                          ("topk", topk)):
            _positive_int(name, val)
        if k_dim % 2:
            raise ValueError(f"k_dim: must be even, got {k_dim}")
        if topk > n_subkeys:
            raise ValueError(f"topk: must be <= n_subkeys ({n_subkeys}), got {topk}")
        v_dim = dim if v_dim is None else _positive_int("v_dim", v_dim)
        self.dim, self.n_subkeys, self.k_dim, self.v_dim = dim, n_subkeys, k_dim, v_dim
        self.heads, self.topk = heads, topk
        self.norm = RMSNorm(dim)
        self.to_q = nn.Linear(dim, heads * k_dim, bias=True)
        bound = 1.0 / math.sqrt(k_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_subkeys, k_dim // 2).uniform_(-bound, bound))
        self.values = nn.Parameter(torch.randn(n_subkeys * n_subkeys, v_dim) / math.sqrt(v_dim))
        self.to_out = nn.Linear(v_dim, dim, bias=True) if v_dim != dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.dim, self.to_q.weight)
        B, T, _ = x.shape
        H, k, n = self.heads, self.topk, self.n_subkeys
        dt = self.values.dtype
        q = self.to_q(self.norm(x)).view(B, T, H, self.k_dim).to(dt)
        keys5 = self.keys.unsqueeze(0)
        with torch.no_grad():
            idx = ops.topk_indices(q.detach().contiguous(), keys5.detach().contiguous(), k, "dot", 1e-3)
        d2 = self.k_dim // 2
        # exact scores of the selected pairs on the native kernels (no per-pair key copies); the
        # same values without a graph from one pass that dots each distinct half row once
        if torch.is_grad_enabled() and (q.requires_grad or self.keys.requires_grad):
            grp = torch.zeros(B, dtype=torch.long, device=x.device)
            kid = recurrence.read_kid(idx, grp, H, n).reshape(-1, k)
            s = ops.pair_scores(q.reshape(-1, d2), self.keys.reshape(-1, d2), kid, "dot", 1e-3)
        else:
            s = ops.slot_scores(q, keys5, idx)
        w = torch.softmax(s.view(B, T, H, 2, k).sum(3), dim=-1)  # per head
        out = ops.gather(self.values, idx.reshape(B * T, H * k).contiguous(),
                         w.reshape(B * T, H * k).contiguous())
        return self.to_out(out.view(B, T, self.v_dim).to(x.dtype))


def param_groups(model: nn.Module, weight_decay: float = 0.1, lr: Optional[float] = None,
                 pkm_value_lr_scale: float = 1.0, no_decay_1d: bool = True) -> List[Dict]:
    """AdamW parameter groups for a model holding FwPKM/PKM layers.

    Excludes the fast-weight initial tables of every FwPKM layer (they are buffers, and any
    parameter a subclass registers under those names is skipped too; the one exception is the
    initial keys of a layer built with `learn_init_keys=True`), puts 1-D parameters
    (biases, norms) in a group without weight decay, and PKM value tables in their own group
    without weight decay and with lr * pkm_value_lr_scale when `lr` is given.
    """
    fast, learned_keys = set(), set()
    pkm_values = []
    for mod in model.modules():
        if isinstance(mod, FwPKM):
            for name in ("init_keys", "init_values"):
                t = getattr(mod, name, None)
                if not isinstance(t, nn.Parameter):
                    continue
                # learned initial keys (SPEC "Extensions") are trained, without weight decay:
                # decay would pull every key towards the origin, away from the queries
                if name == "init_keys" and getattr(mod, "learn_init_keys", False):
                    learned_keys.add(id(t))
                else:
                    fast.add(id(t))
        if isinstance(mod, PKM):
            pkm_values.append(mod.values)
    pkm_ids = {id(p) for p in pkm_values}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in fast or id(p) in pkm_ids or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if (no_decay_1d and p.dim() < 2) or id(p) in learned_keys else decay).append(p)
    groups: List[Dict] = [{"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}]
    pv = [p for p in pkm_values if p.requires_grad]
    if pv:
        g = {"params": pv, "weight_decay": 0.0}
        if lr is not None:
            g["lr"] = lr * pkm_value_lr_scale
        groups.append(g)
    return [g for g in groups if g["params"]]


def telemetry(state: MemoryState) -> Dict[str, float]:
    """Memory telemetry of a state: coverage, collision rate, KL to uniform, mean gate."""
    return state.telemetry()
