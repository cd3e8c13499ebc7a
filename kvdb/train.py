"""`kvdb train`: distil the base model into the knowledge-aware draft (kvdb.draft) and measure it offline.

The loop, top to bottom (``train``):
1. load the base model and the checkpoint to evaluate or resume from (checked before any heavy work);
2. prepare the data (kvdb.train_data): pairs, the base model's answers (kvdb.teacher), the held-out split;
3. build the draft and its vocabulary, and run the frozen first layers once over every example;
4. measure the untrained early exit as the baseline (kvdb.evaluate);
5. each epoch: AdamW over shuffled batches of the token loss (kvdb.losses), evaluate on the held-out pairs, save
   the best (``best_draft_model_epoch<N>.pth``), periodic (``draft_model_epoch<N>.pth``) and last checkpoints,
   the log and the curves.

Under torchrun (kvdb.distributed) rank 0 prepares the data first, every rank trains on its share of each batch with
DistributedDataParallel, and rank 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvdb import distributed
from kvdb.config import Config, DraftConfig
from kvdb.draft import DraftModel, check_compatible, draft_config_from, read_checkpoint, save_checkpoint
from kvdb.errors import CorruptError, NotFoundError, StoreError, ValidationError
from kvdb.evaluate import evaluate
from kvdb.fileio import atomic_write_bytes
from kvdb.lm import pad_right
from kvdb.losses import BatchLoss, batch_loss
from kvdb.prompt import PROMPT_FORMAT
from kvdb.train_data import Example, Prepared, ReferencesFor, prepare

log = logging.getLogger(__name__)

LOG_FILE = "train_log.json"
PLOT_FILE = "train_curves.png"
LAST_FILE = "draft_model_last.pth"
# Per-head scalars of the knowledge module (temperature, sink, pointer gain) need to move by O(1): a larger step.
GAIN_LR_FACTOR = 30.0


# -- the pieces of one step -----------------------------------------------------------------------------------------
def _keep_device(draft: DraftModel) -> torch.device:
    return draft.device if draft.device.type == "cuda" else torch.device("cpu")


@torch.no_grad()
def frozen_states(draft: DraftModel, examples: list[Example], batch_size: int = 8) -> None:
    """Run the frozen first layers once over each example (they never change); keep their output in the model's
    dtype on the CPU (or the GPU). Right padding changes no real position under the causal mask."""
    todo = sorted((e for e in examples if e.states is None), key=lambda e: len(e.ids))
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        ids, _ = pad_right([e.ids for e in chunk], 0)
        hidden = draft.lower(ids.to(draft.device))
        for j, e in enumerate(chunk):
            e.states = hidden[j, : len(e.ids)].to(_keep_device(draft)).clone()


def make_optimizer(draft: DraftModel, lr: float, knowledge_lr: float) -> torch.optim.Optimizer:
    """AdamW with three groups: the trained layers at the fine-tuning rate ``lr``, the knowledge module (which starts
    from scratch) at ``knowledge_lr``, and its per-head gains at ``knowledge_lr * GAIN_LR_FACTOR``."""
    groups = []
    layer_params = [p for name, p in draft.named_parameters() if p.requires_grad and name.startswith("layers.")]
    if layer_params:
        groups.append({"params": layer_params, "lr": lr, "weight_decay": 0.0})
    gains = list(draft.knowledge.gains())
    taken = {id(p) for p in layer_params + gains}
    rest = [p for p in draft.parameters() if p.requires_grad and id(p) not in taken]
    groups.append({"params": rest, "lr": knowledge_lr, "weight_decay": 0.0})
    groups.append({"params": gains, "lr": knowledge_lr * GAIN_LR_FACTOR, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def ddp_wrap(draft: DraftModel):
    """The draft's loss under DistributedDataParallel (gloo on CPU, NCCL on GPUs; rank 0's weights broadcast)."""
    from torch.nn.parallel import DistributedDataParallel

    # No buffer sync per forward: the only buffer (the static vocabulary) never changes after construction.
    return DistributedDataParallel(BatchLoss(draft), device_ids=None, forward_sync_buffers=False)


def rank_batches(n: int, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1) -> list[tuple[list[int], float]]:
    """This rank's share of each batch of one epoch, and the weight of its loss.

    The epoch's order and batches are the single-process ones (shuffled by ``seed``, cut every ``batch_size``), so
    the optimiser takes the same steps with the same global batch; rank r takes every world-th example of each batch.
    DDP averages the ranks' gradients, so a rank's mean loss is weighted by world * (its examples) / (batch size):
    the average is then the gradient of the example-weighted mean. A rank left without examples (a last batch smaller
    than the world) still runs one with weight 0: every rank must take part in every gradient all-reduce."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out = []
    for i in range(0, n, batch_size):
        full = order[i : i + batch_size]
        part = full[rank::world]
        out.append((part, world * len(part) / len(full)) if part else (full[:1], 0.0))
    return out


def train_epoch(draft: DraftModel, optimizer, examples: list[Example], knowledge: dict, vocab: torch.Tensor,
                batch_size: int, seed: int, bar=None, use_knowledge: bool = True, ddp=None) -> float:
    """One pass over ``examples``; returns the mean token loss. With ``ddp`` (from :func:`ddp_wrap`, under torchrun)
    each rank runs its share of every batch and the returned loss is the mean over all ranks' examples."""
    draft.train()
    me = distributed.current() if ddp is not None else distributed.Rank()
    index = draft.vocab_index(vocab)
    total, count = 0.0, 0
    params = draft.trainable_parameters()
    for part, weight in rank_batches(len(examples), batch_size, seed, me.rank, me.world):
        batch = [examples[j] for j in part]
        optimizer.zero_grad(set_to_none=True)
        if ddp is None:
            loss = batch_loss(draft, batch, knowledge, vocab, index, use_knowledge)
            loss.backward()
        else:
            loss = ddp(batch, knowledge, vocab, index, use_knowledge)
            with distributed.collective("the gradient all-reduce"):
                (loss * weight).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        n = len(batch) if weight else 0
        total += loss.item() * n
        count += n
        if bar is not None:
            bar.update(round(len(batch) * me.world / weight) if weight and me.world > 1 else n)
            bar.set_postfix_str(f"loss {total / max(count, 1):.3f}", refresh=False)
    if ddp is not None:
        total, count = distributed.all_reduce_sum([total, count])
    return total / max(count, 1)


# -- files ----------------------------------------------------------------------------------------------------------
def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kvdb-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"cannot write checkpoints to {out} ({exc.strerror or exc}); pass --out with a writable "
                         "folder") from None


def _write_log(out: Path, record: dict[str, Any]) -> Path:
    path = out / LOG_FILE
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    return path


def _plot(out: Path, history: list[dict[str, Any]], baseline: dict[str, Any] | None) -> Path | None:
    """Loss and held-out acceptance per epoch, as a PNG (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    from kvdb.fileio import atomic_path

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    held = [(h["epoch"], h["heldout"].get("loss")) for h in history if h.get("heldout", {}).get("loss") is not None]
    if held:
        ax1.plot([e for e, _ in held], [v for _, v in held], "s-", label="held-out loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [h["heldout"]["top1_agreement"] for h in history], "o-", label="draft top-1 agreement")
    ax2.plot(epochs, [h["heldout"]["draft_lengths"]["4"]["accepted_per_step"] / 4 for h in history], "^--",
             label="accepted per step / 4 (k=4)")
    if baseline:
        ax2.axhline(baseline["top1_agreement"], color="grey", linestyle=":", label="untrained early exit")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("held-out acceptance")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = out / PLOT_FILE
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _starting_checkpoint(out: Path, lm, dcfg: DraftConfig, eval_only: bool, resume: bool,
                         checkpoint) -> tuple[dict | None, Path | None, DraftConfig]:
    """The checkpoint to evaluate (``eval_only``) or continue from (``resume``), and the draft config to use."""
    from kvdb.draft import best_checkpoint, latest_checkpoint

    if eval_only:
        path = Path(checkpoint) if checkpoint else (best_checkpoint(out) or latest_checkpoint(out))
        if path is None:
            raise NotFoundError(f"no draft checkpoint in {out}; run `kvdb train` first")
        payload = read_checkpoint(path)
        return payload, path, check_compatible(payload, lm, dcfg, path)
    if not resume:
        return None, None, dcfg
    path = out / LAST_FILE if (out / LAST_FILE).is_file() else latest_checkpoint(out)
    if path is None:
        raise NotFoundError(f"--resume: no draft checkpoint in {out} to continue from; train without --resume")
    payload = read_checkpoint(path)
    check_compatible(payload, lm, dcfg, path)
    return payload, path, draft_config_from(payload)


# -- the draft ------------------------------------------------------------------------------------------------------
def build_draft(lm, dcfg: DraftConfig, data: Prepared, payload: dict | None,
                path: Path | None) -> tuple[DraftModel, torch.Tensor]:
    """The draft (fresh, or with a checkpoint's weights) in fp32 master weights, and its training vocabulary: the
    frequent ids plus every token of the training data (prompts, answers, knowledge)."""
    static = None
    if dcfg.vocab_frequent:
        static = torch.arange(min(dcfg.vocab_frequent, lm.model.get_output_embeddings().weight.shape[0]))
        static = torch.unique(torch.cat([static, *[torch.tensor(e.answer) for e in data.train]]))
    draft = DraftModel(lm, dcfg, static_vocab=static)
    if payload is not None:
        try:
            draft.load_state_dict(payload["state_dict"], strict=True)
        except (RuntimeError, KeyError) as exc:
            raise CorruptError(f"{path} does not fit the draft it describes "
                               f"({str(exc).strip().splitlines()[0][:160]}); train again") from None
    else:
        draft.knowledge.set_statistics(torch.cat([k.keys for k in data.knowledge.values()]))
    draft.float()  # with a bf16 base model the forward runs under autocast (kvdb.losses.autocast)
    if not dcfg.vocab_frequent:
        return draft, torch.arange(draft.vocab_size)
    tokens = [torch.tensor(e.prompt + e.answer) for e in data.train]
    tokens += [k.next_ids for k in data.knowledge.values()]
    tokens += [e.recorded.next_ids for e in data.train if e.recorded is not None]
    return draft, draft.vocab_for(*tokens)


# -- progress across epochs -----------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where a run stands: restored from a checkpoint when resuming, saved in every checkpoint it writes."""

    start_epoch: int = 0
    end_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float = -1.0
    best_path: str | None = None
    checkpoints: list[str] = field(default_factory=list)  # written by this run


def _progress(payload: dict | None, optimizer, epochs: int | None, num_epochs: int) -> Progress:
    """A fresh run's progress, or a resumed one's (with its optimiser moments where their layout still fits): it
    continues the epoch numbering and, without ``epochs``, finishes the epochs it had planned."""
    if payload is None:
        return Progress(0, epochs if epochs is not None else num_epochs)
    if payload.get("optimizer"):
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError, RuntimeError):
            log.info("the checkpoint's optimiser state does not fit; continuing with fresh moments")
    start = int(payload["epoch"])
    info = payload.get("training") or {}
    target = int(info.get("target_epoch", start))
    planned = epochs if epochs is not None else (target - start if target > start else num_epochs)
    return Progress(start, start + planned, list(payload.get("history") or []),
                    float(info.get("best_metric", -1.0)), info.get("best_path"))


def _save_epoch(out: Path, draft: DraftModel, optimizer, progress: Progress, record: dict[str, Any],
                metrics: dict[str, Any], base: dict[str, Any], save_every: int) -> None:
    """The epoch's checkpoints: a new best (replacing this run's previous best), a periodic one, and the last."""
    me = distributed.current()
    epoch, top1 = record["epoch"], record["heldout"]["top1_agreement"]
    improved = top1 > progress.best_metric
    if improved:
        superseded = progress.best_path if progress.best_path in progress.checkpoints else None
        progress.best_metric, progress.best_path = top1, str(out / f"best_draft_model_epoch{epoch}.pth")
    info = {**base, "best_metric": progress.best_metric, "best_path": progress.best_path,
            "target_epoch": progress.end_epoch}
    state = optimizer.state_dict()

    def save(path: Path) -> None:  # every rank keeps the same bookkeeping; rank 0 alone writes files
        if me.is_main:
            save_checkpoint(path, draft, epoch=epoch, metrics=metrics, optimizer_state=state, training=info,
                            history=progress.history)

    if improved:
        save(Path(progress.best_path))
        progress.checkpoints.append(progress.best_path)
        if superseded:  # a draft checkpoint is large (~140 MB for SmolLM2): the new best replaces the old
            if me.is_main:
                Path(superseded).unlink(missing_ok=True)
            progress.checkpoints.remove(superseded)
    if save_every > 0 and epoch % save_every == 0:
        save(out / f"draft_model_epoch{epoch}.pth")
        progress.checkpoints.append(str(out / f"draft_model_epoch{epoch}.pth"))
    save(out / LAST_FILE)


# -- the loop -------------------------------------------------------------------------------------------------------
def train(runtime, epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
          resume: bool = False, cache: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          eval_only: bool = False, progress: bool = True, lm=None, references_for: ReferencesFor | None = None,
          checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or with ``eval_only`` evaluate) the draft; returns final metrics and the checkpoint paths.

    ``epochs`` is how many epochs this call runs (default ``training.num_epochs``); with ``resume`` numbering
    continues from the latest checkpoint in ``out``, and a run that stopped before its planned epochs finishes them.
    """
    from kvdb.lm import load_model

    t_start = time.perf_counter()
    cfg: Config = runtime.config
    tcfg = cfg.training
    batch_size = batch_size or tcfg.batch_size
    lr = lr if lr is not None else tcfg.learning_rate
    if batch_size < 1 or lr <= 0 or (epochs is not None and epochs < 0):
        raise ValidationError("--batch-size must be at least 1, --lr above 0 and --epochs at least 0")
    out = Path(out) if out is not None else runtime.home.checkpoints_dir
    if not eval_only:
        _check_out_dir(out)
    torch.manual_seed(tcfg.seed)
    lm = lm or load_model(cfg.model, runtime.home)
    payload, ckpt_path, dcfg = _starting_checkpoint(out, lm, cfg.draft, eval_only, resume, checkpoint)

    me = distributed.current()
    with distributed.main_first():  # rank 0 computes and records the answers; the others then read them
        data = prepare(runtime, lm, dcfg, cache=cache, references_for=references_for,
                       progress=progress and me.is_main)
    t_data = time.perf_counter()
    draft, train_vocab = build_draft(lm, dcfg, data, payload, ckpt_path)
    eval_set = data.heldout or data.train
    frozen_states(draft, list(eval_set) if eval_only else data.train + data.heldout)
    t_states = time.perf_counter()

    # The untrained early exit: fresh copies of the same layers (so the inputs computed above fit), full head.
    baseline = evaluate(DraftModel(lm, dataclasses.replace(dcfg, vocab_frequent=0)), eval_set, data.knowledge,
                        use_knowledge=False, full_vocab=True)
    result: dict[str, Any] = {"out": str(out), "eval_set": "heldout" if data.heldout else "train (no held-out split)",
                              "data": data.info, "untrained_early_exit": baseline,
                              "draft_config": dataclasses.asdict(dcfg)}
    if eval_only:
        result.update({"checkpoint": str(ckpt_path), "epoch": payload["epoch"],
                       "metrics": evaluate(draft, eval_set, data.knowledge),
                       "without_knowledge": evaluate(draft, eval_set, data.knowledge, use_knowledge=False),
                       "seconds": round(time.perf_counter() - t_start, 2)})
        return result

    optimizer = make_optimizer(draft, lr, tcfg.knowledge_learning_rate)
    run = _progress(payload, optimizer, epochs, tcfg.num_epochs)
    if draft.layers:
        optimizer.param_groups[0]["lr"] = lr  # a resumed run may be given another --lr
    base_info = {"batch_size": batch_size, "lr": lr, "prompt_format": PROMPT_FORMAT, "data": data.info}
    train_log = {"format": "kvdb.train_log", "base_model": lm.describe(), "draft_config": dataclasses.asdict(dcfg),
                 "training": {"batch_size": batch_size, "lr": lr, **dataclasses.asdict(tcfg)}, "data": data.info,
                 "eval_set": result["eval_set"], "untrained_early_exit": baseline, "epochs": run.history}
    if me.distributed:
        train_log["training"]["ranks"] = result["ranks"] = me.world
    files = _run_epochs(draft, optimizer, data, train_vocab, run, out, batch_size, tcfg, baseline, base_info,
                        train_log, progress)
    final = run.history[-1] if run.history else None
    result.update({
        "epoch": final["epoch"] if final else run.start_epoch,
        "epochs_run": run.end_epoch - run.start_epoch,
        "metrics": final["heldout"] if final else evaluate(draft, eval_set, data.knowledge),
        "train_loss": final["train_loss"] if final else None,
        "best": {"metric": run.best_metric, "path": run.best_path},
        "checkpoints": run.checkpoints,
        "last_checkpoint": str(out / LAST_FILE) if final else None,
        **files,
        "seconds_data": round(t_data - t_start, 2),
        "seconds_states": round(t_states - t_data, 2),
        "seconds": round(time.perf_counter() - t_start, 2),
    })
    if tcfg.warm_answers and cache is None and me.is_main:
        from kvdb.warm import warm_answers

        result["warmed"] = warm_answers(runtime, lm, progress=progress)
    return result


def _run_epochs(draft: DraftModel, optimizer, data: Prepared, vocab: torch.Tensor, run: Progress, out: Path,
                batch_size: int, tcfg, baseline: dict, base_info: dict, train_log: dict,
                progress: bool) -> dict[str, str | None]:
    """Epochs ``run.start_epoch + 1 .. run.end_epoch``: train, evaluate, save; returns the log and plot paths."""
    from tqdm import tqdm

    me = distributed.current()
    eval_set = data.heldout or data.train
    total = len(data.train) * (run.end_epoch - run.start_epoch)
    bar = tqdm(total=total, unit="ex", desc="train", disable=not progress or total == 0 or not me.is_main,
               dynamic_ncols=True)
    ddp = ddp_wrap(draft) if me.distributed else None
    log_path = plot_path = None
    try:
        for epoch in range(run.start_epoch + 1, run.end_epoch + 1):
            t0 = time.perf_counter()
            bar.set_description(f"epoch {epoch}/{run.end_epoch}")
            loss = train_epoch(draft, optimizer, data.train, data.knowledge, vocab, batch_size,
                               seed=tcfg.seed + epoch, bar=bar, ddp=ddp)
            t1 = time.perf_counter()
            held = evaluate(draft, eval_set, data.knowledge)
            record = {"epoch": epoch, "train_loss": round(loss, 4), "heldout": held, "seconds": round(t1 - t0, 2),
                      "eval_seconds": round(time.perf_counter() - t1, 2)}
            run.history.append(record)
            metrics = {"train_loss": record["train_loss"], "heldout": held, "untrained_early_exit": baseline}
            _save_epoch(out, draft, optimizer, run, record, metrics, base_info, tcfg.save_every)
            train_log["epochs"] = run.history
            if me.is_main:
                log_path, plot_path = _write_log(out, train_log), _plot(out, run.history, baseline)
            bar.set_postfix_str(f"loss {loss:.3f} agree {held['top1_agreement']:.3f}", refresh=True)
    finally:
        bar.close()
    return {"log": str(log_path) if log_path else None, "plot": str(plot_path) if plot_path else None}
