"""The training run behind ``fwpkm train`` (its options: ``fwpkm_ext.cli.train``).

    fwpkm tokenizer train --corpus DIR --vocab-size 8192 --out tok.model
    fwpkm train --preset tiny --corpus DIR --steps 200 --out runs/tiny

The output directory holds ``config.json`` (the :class:`LMConfig`), ``model.safetensors``,
``tokenizer.model``, ``train_state.pt`` (optimizer, scheduler, RNG states, data position),
``train_args.json`` and ``metrics.jsonl``. ``--resume`` continues from it exactly. Data parallel
runs use torchrun (``python -m fwpkm_ext.train`` is the command line):

    torchrun --nproc_per_node 2 -m fwpkm_ext.train train ...

(gloo on CPU, nccl on GPU, configured from the torch.distributed environment variables).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from ._fileio import atomic_torch_save
from .data import VARIED_WORDINGS, build_datasets, read_corpus, resolve_corpus, split_documents
from .input_checks import check_corpus, check_input_file, check_json_or_file, check_output_path
from .layers import param_groups
from .model import LM, LMConfig, config_overrides
from .run_args import portable_args, write_training_args
from .tokenizer import TOKENIZER_FILENAME, Tokenizer, train_tokenizer

__all__ = ["train", "lr_lambda", "heldout_loss", "STATE_FILE"]

STATE_FILE = "train_state.pt"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def _config_diff(a: LMConfig, b: LMConfig) -> List[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: checkpoint {da[k]!r} vs requested {db.get(k)!r}"
            for k in sorted(da) if da[k] != db.get(k)]


class _Dist:
    """torch.distributed setup from the torchrun environment variables (or a single process)."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device_arg)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank if self.world > 1 else 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        self.device = dev
        self.enabled = self.world > 1
        if self.enabled:
            if not tdist.is_initialized():
                tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def all_sum(self, values: List[float]) -> List[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        tdist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.enabled:
            if tdist.is_initialized():
                tdist.destroy_process_group()


def _rng_state() -> Dict[str, Any]:
    npst = np.random.get_state()
    st: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]),
                  float(npst[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Dict[str, Any]) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def heldout_loss(model: torch.nn.Module, data, indices: List[int], batch_size: int,
             device: torch.device, amp_dtype: Optional[torch.dtype], dist: Optional[_Dist] = None
             ) -> Dict[str, float]:
    """Mean token loss over the given sequences (split over processes) -> loss, ppl, tokens."""
    world = dist.world if dist else 1
    rank = dist.rank if dist else 0
    mine = indices[rank::world]
    was_training = model.training
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            batch = np.stack([data.sequence(j) for j in mine[i: i + batch_size]])
            x = torch.from_numpy(batch).to(device)
            with _autocast(device, amp_dtype):
                logits, _ = model(x[:, :-1], use_cache=False)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                   x[:, 1:].reshape(-1), reduction="sum")
            tot += float(loss)
            n += int(x[:, 1:].numel())
    if dist is not None:
        tot, n = dist.all_sum([tot, float(n)])
    model.train(was_training)
    mean = tot / max(n, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": int(n)}


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    """One training run (the options of ``fwpkm train``, as parsed); 0 when it ends."""
    if args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if args.grad_accum < 1:
        raise ValueError(f"--grad-accum must be positive, got {args.grad_accum}")
    if not 0.0 <= args.needle_rate <= 1.0:
        raise ValueError(f"--needle-rate must be in [0, 1], got {args.needle_rate}")
    nlw = getattr(args, "needle_loss_weight", 0.0)
    if not (isinstance(nlw, (int, float)) and math.isfinite(nlw) and nlw >= 0):
        raise ValueError(f"--needle-loss-weight must be a finite number >= 0, got {nlw}")
    if getattr(args, "needles_per_seq", 1) < 1:
        raise ValueError(f"--needles-per-seq must be positive, got {args.needles_per_seq}")
    _check_paths(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    dist = _Dist(args.device)
    device = dist.device
    try:
        return _train(args, dist, device)
    finally:
        dist.close()


def _check_paths(args: argparse.Namespace) -> None:
    """Every path argument, before the process group, the corpus and the model are set up."""
    check_output_path(args.out, "--out", directory=True)
    check_corpus(resolve_corpus(args.corpus), "--corpus", getattr(args, "force_binary", False))
    if args.tokenizer:
        check_input_file(args.tokenizer, "--tokenizer")
    check_json_or_file(args.config, "--config")
    if args.init_from and not args.resume:
        if not os.path.isdir(args.init_from):
            raise FileNotFoundError(f"--init-from: directory not found: {args.init_from!r}")
        check_input_file(os.path.join(args.init_from, "model.safetensors"), "--init-from")


def _init_from(model: LM, ckpt_dir: str) -> str:
    """Load the matching tensors of a saved model into ``model`` (see --init-from)."""
    path = os.path.join(ckpt_dir, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init-from: {path} not found")
    src = load_file(path)
    own = model.state_dict()
    bad = [k for k in src if k in own and tuple(src[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"--init-from: {ckpt_dir} has other shapes for {bad[:5]}: it is not the "
                         f"same architecture as --preset/--config")
    # the initial fast-weight tables follow this run's config (seed, zero values, ...)
    skip = (".init_keys", ".init_values")
    take = {k: v for k, v in src.items() if k in own and not k.endswith(skip)}
    with torch.no_grad():
        for k, v in take.items():
            own[k].copy_(v.to(own[k].dtype))
    fresh = sorted(k for k in own if k not in take and not k.endswith(skip))
    # a sublayer the loaded model did not have starts as a no-op (its output projection is
    # zero), so the loaded model's function is unchanged at step 0 and training grows it
    zeroed = []
    with torch.no_grad():
        for i, b in enumerate(model.blocks):
            if b.fwpkm is not None and f"blocks.{i}.fwpkm.to_out.weight" in fresh:
                b.fwpkm.to_out.weight.zero_()
                b.fwpkm.to_out.bias.zero_()
                zeroed.append(i)
    return (f"init-from {ckpt_dir}: {len(take)} tensors loaded"
            + (f", fresh: {fresh}" if fresh else "")
            + (f"; new FwPKM sublayers {zeroed} start with a zero output projection" if zeroed else ""))


def _log(dist: _Dist, msg: str, bar=None) -> None:
    if not dist.main:
        return
    if bar is not None:
        bar.write(msg)
    else:
        print(msg, flush=True)


def _train(args: argparse.Namespace, dist: _Dist, device: torch.device) -> int:
    out = args.out
    state_path = os.path.join(out, STATE_FILE)
    if args.resume and not os.path.isfile(state_path):
        raise FileNotFoundError(f"--resume: no checkpoint to resume in {out} ({STATE_FILE} missing)")
    if not args.resume and os.path.isfile(state_path):
        raise ValueError(f"{out} already holds a training run ({STATE_FILE}): pass --resume to "
                         f"continue it, or choose another --out")
    if dist.main:
        os.makedirs(out, exist_ok=True)
    dist.barrier()

    # ---- model config (before anything slow, so config errors come first) -----------------
    overrides = config_overrides(args.config)
    cfg = LMConfig.preset(args.preset, **overrides)
    ckpt_cfg = None
    if args.resume:
        ckpt_cfg_path = os.path.join(out, "config.json")
        if not os.path.isfile(ckpt_cfg_path):
            raise FileNotFoundError(f"--resume: {ckpt_cfg_path} missing")
        ckpt_cfg = LMConfig.load(ckpt_cfg_path)

    # ---- corpus and tokenizer ---------------------------------------------------------------
    corpus = resolve_corpus(args.corpus)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = read_corpus(corpus, args.encoding_errors)
    if dist.main:
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    tok_out = os.path.join(out, TOKENIZER_FILENAME)
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    elif os.path.isfile(tok_out):
        tok = Tokenizer.load(tok_out)
    else:
        tok = None
        if dist.main:
            train_files, _ = split_documents([p for p, _ in docs], args.val_fraction, args.seed)
            keep = set(train_files)
            t0 = time.time()
            tok = train_tokenizer(None, vocab_size=cfg.vocab_size, seed=args.seed,
                                  texts=(t for p, t in docs if p in keep))
            tok.save(tok_out)
            _log(dist, f"trained tokenizer on {len(train_files)} training documents: "
                       f"vocab_size={tok.vocab_size} ({time.time() - t0:.1f}s) -> {tok_out}")
        dist.barrier()
        if tok is None:
            tok = Tokenizer.load(tok_out)
    if tok.vocab_size != cfg.vocab_size:
        _log(dist, f"model vocab_size set to the tokenizer's: {tok.vocab_size} "
                   f"(config: {cfg.vocab_size})")
        cfg = cfg.replace(vocab_size=tok.vocab_size)
    if ckpt_cfg is not None and ckpt_cfg != cfg:
        diff = _config_diff(ckpt_cfg, cfg)
        raise ValueError(f"the checkpoint in {out} was trained with another model config ("
                         + "; ".join(diff) + "): pass the same --preset/--config to resume, "
                         "or use a new --out")

    # ---- data -------------------------------------------------------------------------------
    cache_dir = os.path.join(out, "cache")
    seq_len = args.seq_len or (4096 if device.type == "cuda" else 1024)
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {seq_len}")
    if dist.main:
        ds = build_datasets(corpus, tok, seq_len, seed=args.seed,
                            val_fraction=args.val_fraction, cache_dir=cache_dir, docs=docs)
    dist.barrier()
    if not dist.main:
        ds = build_datasets(corpus, tok, seq_len, seed=args.seed,
                            val_fraction=args.val_fraction, cache_dir=cache_dir, docs=docs)
    del docs
    train_data, val_data = ds.train, ds.val

    # ---- model, optimizer, schedule ---------------------------------------------------------
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    model = LM(cfg)
    if args.init_from and not args.resume:
        _log(dist, _init_from(model, args.init_from))
    model = model.to(device)
    batch_size = args.batch_size or (8 if device.type == "cuda" else 1)
    if args.dtype == "auto":
        amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    else:
        amp_dtype = None if args.dtype == "float32" else torch.bfloat16
    warmup = args.warmup if args.warmup is not None else min(1000, max(1, args.steps // 20))

    # no fast-weight initial tables; no weight decay on 1-D parameters; PKM value tables at
    # lr * pkm_value_lr_scale
    groups = param_groups(model, weight_decay=args.weight_decay, lr=args.lr,
                          pkm_value_lr_scale=args.pkm_value_lr_scale)
    opt_kw: Dict[str, Any] = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        opt_kw["fused"] = True
    optimizer = torch.optim.AdamW(groups, **opt_kw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup, args.steps, args.min_lr_ratio))

    step = 0
    samples_seen = 0
    if args.resume:
        model.load_weights(os.path.join(out, "model.safetensors"), map_location=str(device))
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st.get("tokenizer_sha") not in (None, tok.fingerprint()):
            raise ValueError(f"the checkpoint in {out} was trained with another tokenizer than "
                             f"{args.tokenizer or tok_out}")
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        step = int(st["step"])
        samples_seen = int(st["samples_seen"])
        if st.get("seq_len", train_data.seq_len) != train_data.seq_len:
            _log(dist, f"warning: resuming a run trained with --seq-len {st.get('seq_len')} "
                       f"with {train_data.seq_len}: the data order is not the uninterrupted one")
        if st.get("world_size", 1) != dist.world:
            _log(dist, f"warning: resuming a {st.get('world_size')}-process run with "
                       f"{dist.world} processes: the data order is not the uninterrupted one")
        rng = st.get("rng", {})
        r = rng.get(str(dist.rank)) or rng.get("0")
        if r is not None:
            _set_rng_state(r)
        if step >= args.steps:
            _log(dist, f"checkpoint in {out} is already at step {step} >= --steps {args.steps}")

    ddp_model = model
    if dist.enabled:
        # The FwPKM initial tables are constant buffers (the same on every rank after DDP's
        # initial broadcast): do not re-broadcast them (up to 512 MB each) every forward.
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        broadcast_buffers=False)

    global_batch = batch_size * args.grad_accum * dist.world
    tokens_per_step = global_batch * train_data.seq_len
    val_idx = val_data.eval_sequences(args.val_batches * batch_size * dist.world) if val_data else []
    n_params = model.num_params()
    if dist.main:
        cfg.save(os.path.join(out, "config.json"))
        write_training_args(out, vars(args))
    _log(dist, f"model: preset={args.preset} params={n_params / 1e6:.2f}M "
               f"fwpkm_layers={cfg.fwpkm_layers} pkm_layers={cfg.pkm_layers} window={cfg.window}"
               f" | data: {len(ds.train_files)} train docs ({train_data.num_tokens} tokens, "
               f"{len(train_data)} seqs of {train_data.seq_len}), {len(ds.val_files)} val docs "
               f"({val_data.num_tokens if val_data else 0} tokens)"
               f" | device={device} procs={dist.world} batch={batch_size}x{args.grad_accum}"
               f"x{dist.world} amp={amp_dtype}")

    metrics_path = os.path.join(out, "metrics.jsonl")

    def log_metrics(rec: Dict[str, Any]) -> None:
        if dist.main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    def save(step_now: int) -> None:
        rngs = {str(dist.rank): _rng_state()}
        if dist.enabled:
            gathered: List[Any] = [None] * dist.world
            tdist.all_gather_object(gathered, rngs)
            rngs = {k: v for g in gathered for k, v in g.items()}
        if not dist.main:
            return
        model.save_pretrained(out)  # model.safetensors + config.json (atomic enough: small)
        tok.save(os.path.join(out, TOKENIZER_FILENAME))
        # unique tmp name, fsync, rename: a killed run keeps the last checkpoint
        atomic_torch_save({
            "step": step_now, "samples_seen": samples_seen, "world_size": dist.world,
            "seq_len": train_data.seq_len, "batch_size": batch_size,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rngs, "args": portable_args(vars(args)),
            "config": cfg.to_dict(), "tokenizer_sha": tok.fingerprint(),
        }, state_path)

    last_val: Optional[Dict[str, float]] = None

    def validate(step_now: int, bar=None) -> Optional[Dict[str, float]]:
        if val_data is None:
            return None
        r = heldout_loss(model, val_data, val_idx, batch_size, device, amp_dtype, dist)
        _log(dist, f"step {step_now}: val_loss={r['loss']:.4f} val_ppl={r['ppl']:.2f} "
                   f"({r['tokens']} tokens)", bar)
        log_metrics({"step": step_now, "val_loss": r["loss"], "val_ppl": r["ppl"]})
        return r

    if step == 0:
        last_val = validate(0)

    stop_at = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
    bar = None
    if dist.main and not args.no_progress and step < stop_at:
        bar = tqdm(total=stop_at, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)

    model.train()
    train_time = 0.0
    tok_count = 0
    ema_loss = None
    train_loss = float("nan")
    needles_per_seq = getattr(args, "needles_per_seq", 1)
    wordings = VARIED_WORDINGS if getattr(args, "needle_wordings", "spec") == "varied" else None
    needle_weight = float(getattr(args, "needle_loss_weight", 0.0))
    needle_stats = [0.0, 0.0, 0]  # answer-token loss sum, correct argmax, count (since last log)
    while step < stop_at:
        t_step = time.time()
        loss_sum = 0.0
        for a in range(args.grad_accum):
            start = samples_seen + (a * dist.world + dist.rank) * batch_size
            answers: List[Tuple[int, int]] = []
            batch = train_data.batch(start, batch_size, tok, args.needle_rate, needles_per_seq,
                                     answers, wordings)
            x = torch.from_numpy(batch).to(device, non_blocking=True)
            sync = (a == args.grad_accum - 1) or not dist.enabled
            ctx = contextlib.nullcontext() if sync else ddp_model.no_sync()
            with ctx:
                with _autocast(device, amp_dtype):
                    logits, _ = ddp_model(x[:, :-1], use_cache=False)
                tok_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                           x[:, 1:].reshape(-1), reduction="none")
                loss = tok_loss.mean()
                objective = loss
                if answers:  # (row, position predicting the answer token) of each needle answer
                    rows = torch.tensor([r for r, _ in answers], device=device)
                    cols = torch.tensor([p - 1 for _, p in answers], device=device)
                    if needle_weight > 0:
                        # recipe lever: the needle answers are ~3% of the tokens; an extra term
                        # on their mean loss makes retrieval a visible part of the gradient
                        objective = loss + needle_weight * tok_loss.view(x.shape[0], -1)[rows, cols].mean()
                (objective / args.grad_accum).backward()
            loss_sum += float(loss.detach())
            if answers:
                with torch.no_grad():
                    tl = tok_loss.detach().view(x.shape[0], -1)[rows, cols]
                    hit = logits.detach()[rows, cols].argmax(-1) == x[rows, cols + 1]
                needle_stats[0] += float(tl.sum())
                needle_stats[1] += float(hit.sum())
                needle_stats[2] += len(answers)
        if args.clip and args.clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        else:
            gnorm = float("nan")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        samples_seen += global_batch
        train_loss = loss_sum / args.grad_accum
        if dist.enabled:
            train_loss = dist.all_sum([train_loss])[0] / dist.world
        ema_loss = train_loss if ema_loss is None else 0.9 * ema_loss + 0.1 * train_loss
        tok_count += tokens_per_step
        train_time += time.time() - t_step
        tps = tok_count / max(train_time, 1e-9)
        if bar is not None:
            bar.set_postfix(loss=f"{ema_loss:.3f}", tok_s=f"{tps:.0f}",
                            lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
        if step % 10 == 0 or step == stop_at:
            rec = {"step": step, "loss": train_loss, "lr": scheduler.get_last_lr()[0],
                   "grad_norm": gnorm, "tokens_per_s": tps}
            if needle_stats[2]:
                # answer tokens of the needle queries: loss and argmax accuracy (this process)
                rec["needle_loss"] = needle_stats[0] / needle_stats[2]
                rec["needle_acc"] = needle_stats[1] / needle_stats[2]
                needle_stats = [0.0, 0.0, 0]
            log_metrics(rec)
        if not math.isfinite(train_loss):
            if bar is not None:
                bar.close()
            raise FloatingPointError(f"non-finite training loss at step {step}")
        did_val = False
        if args.val_every and step % args.val_every == 0 and step < args.steps:
            last_val = validate(step, bar)
            did_val = True
        if step < stop_at and ((args.save_every and step % args.save_every == 0)
                               or (did_val and not args.save_every)):
            save(step)
    if bar is not None:
        bar.close()
    final_tps = tok_count / max(train_time, 1e-9) if tok_count else 0.0

    if step >= args.steps:
        last_val = validate(step)
    save(step)
    if dist.main:
        parts = [f"step={step}", f"train_loss={train_loss:.4f}"]
        if tok_count:
            parts.append(f"tokens_per_s={final_tps:.0f}")
        if last_val is not None:
            parts += [f"val_loss={last_val['loss']:.4f}", f"val_ppl={last_val['ppl']:.2f}"]
        else:
            parts.append("val_ppl=nan")
        print(("stopped (resume with --resume): " if step < args.steps else "done: ")
              + " ".join(parts), flush=True)
    return 0


if __name__ == "__main__":  # `python -m fwpkm_ext.train train|tokenizer ...` (torchrun runs this)
    from fwpkm_ext.cli.train import main

    sys.exit(main())
