"""The LLaVA training recipe on one device: stages, optimizer, schedule, checkpoints, resume.

Contract. ``Trainer(model, processor, args, train_dataset, eval_dataset=None, data_collator=None)`` trains a
``LlavaForConditionalGeneration`` in one of the stages of LLaVA-1.5 (see notes/training-anchors.md §1.2):

- ``"pretrain"`` (feature alignment): only the multimodal projector learns; vision tower and text model are frozen.
- ``"finetune"`` (visual instruction tuning): projector + text model (embeddings and lm_head included) learn; the
  vision tower stays frozen unless ``tune_vision_tower=True``.
- ``"full"``: every parameter learns (for towers and text models trained from scratch, as the demo model is).

The loss is next-token cross-entropy on the labelled (assistant) tokens only, normalised by the number of
labelled tokens in the whole accumulation window, so ``batch_size * grad_accum`` splits never change the update
(the bias of averaging per micro-batch means, notes §2/§5). The lm_head runs only on labelled positions. AdamW
(no weight decay on biases and norms), linear warmup then cosine decay to zero, gradient clipping, optional
gradient checkpointing, bf16 autocast where it pays (``precision="auto"``: bf16 on CUDA with bf16 support, fp32 on
CPU, where bf16 autocast measured far slower for small models). A tqdm bar shows loss and learning rate.

Checkpoints are Hugging Face directories (``config.json``, ``model.safetensors``, ``generation_config.json``,
tokenizer and processor files, loadable by fastllava and transformers) plus ``trainer_state.pt`` (optimizer,
scheduler, step, data position and RNG states; tensors and plain containers only, read back with
``weights_only=True``) and a readable ``trainer_state.json``. They are written to ``output_dir/checkpoint-<step>``
every ``save_steps`` and the final model to ``output_dir``. ``train(resume_from_checkpoint=dir | "latest")``
continues exactly where the checkpoint stopped: same weights, optimizer moments, schedule and data order.

``train_main(argv)`` is the ``fastllava train`` command line (``--help`` lists the options).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from fastllava.train.collator import IGNORE_INDEX, LlavaCollator, LlavaDataset, SequenceTooLongError

STAGES = ("pretrain", "finetune", "full")
TRAINER_STATE_NAME = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------------------------------------------------
# Stages


def set_trainable(model: torch.nn.Module, stage: str, tune_vision_tower: bool = False) -> dict[str, int]:
    """Freeze/unfreeze the model's parts for ``stage``; return trainable parameter counts per part."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    parts = {
        "vision_tower": model.model.vision_tower,
        "multi_modal_projector": model.model.multi_modal_projector,
        "language_model": model.model.language_model,
        "lm_head": model.lm_head,
    }
    trainable = {
        "pretrain": {"multi_modal_projector"},
        "finetune": {"multi_modal_projector", "language_model", "lm_head"},
        "full": set(parts),
    }[stage]
    if tune_vision_tower:
        trainable = trainable | {"vision_tower"}
    model.requires_grad_(False)
    for name in trainable:
        parts[name].requires_grad_(True)
    return {name: sum(p.numel() for p in module.parameters() if p.requires_grad) for name, module in parts.items()}


# ---------------------------------------------------------------------------------------------------------------
# Arguments


@dataclass
class TrainingArguments:
    """Options of one training run (names follow transformers' TrainingArguments where there is one)."""

    output_dir: str
    stage: str = "finetune"
    tune_vision_tower: bool = False
    num_train_epochs: float = 1.0
    max_steps: int | None = None          # optimizer steps; overrides num_train_epochs
    learning_rate: float = 2e-5
    projector_lr: float | None = None     # LLaVA's --mm_projector_lr; None = learning_rate
    vision_tower_lr: float | None = None  # when the tower learns; None = learning_rate
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None       # overrides warmup_ratio
    min_lr_ratio: float = 0.0             # cosine decays to learning_rate * min_lr_ratio
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    precision: str = "auto"               # "auto", "fp32" or "bf16" (autocast)
    device: str | None = None             # default: cuda when available, else cpu
    num_threads: int | None = None        # torch.set_num_threads on CPU
    dataloader_num_workers: int = 0
    shuffle: bool = True                  # False: the dataset's own order (one that is already random, or grouped)
    logging_steps: int = 10
    eval_steps: int | None = None
    eval_max_batches: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None
    save_final: bool = True
    seed: int = 0
    progress: bool = True                 # the tqdm bar
    log_to_stderr: bool = True            # one JSON line per logging/eval step

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch size and gradient accumulation steps must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate: linear warmup over ``warmup`` steps, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_ratio + (1.0 - min_ratio) * cosine


# ---------------------------------------------------------------------------------------------------------------
# Data order: a permutation per epoch from (seed, epoch), so a resumed run sees the same batches.


class _EpochSampler(torch.utils.data.Sampler):
    def __init__(self, size: int, seed: int, epoch: int, skip: int = 0, shuffle: bool = True):
        self.size, self.seed, self.epoch, self.skip, self.shuffle = size, seed, epoch, skip, shuffle

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.skip, self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return iter(order[self.skip:])

    def __len__(self) -> int:
        return self.size - self.skip


class _SkipTooLong:
    """Collate wrapper: records that cannot fit max_length come back as None and are dropped (and counted)."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except SequenceTooLongError:
            return None


# ---------------------------------------------------------------------------------------------------------------
# Loss


def labelled_token_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _right_padded(attention_mask: torch.Tensor | None) -> bool:
    if attention_mask is None:
        return True
    # every row is ones then zeros: cumulative products equal the mask itself
    return bool((attention_mask.cumprod(dim=1) == attention_mask).all())


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens of ``batch`` and their count.

    The decoder runs on the whole sequence; the lm_head and the softmax only on positions whose next token is
    labelled. Right padding needs no attention mask (causal attention never looks right), which keeps the fused
    causal attention path.
    """
    attention_mask = batch.get("attention_mask")
    if _right_padded(attention_mask):
        attention_mask = None
    out = model.model(input_ids=batch["input_ids"], pixel_values=batch.get("pixel_values"),
                      attention_mask=attention_mask)
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1, C): position t predicts token t+1
    targets = batch["labels"][:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[keep])  # (N, V)
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


# ---------------------------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """Single-device trainer for the LLaVA stages (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, processor: Any, args: TrainingArguments,
                 train_dataset: torch.utils.data.Dataset | None = None,
                 eval_dataset: torch.utils.data.Dataset | None = None, data_collator: Any = None):
        self.model = model
        self.processor = processor
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.collator = data_collator or LlavaCollator(processor)
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast_dtype = self._autocast_dtype()
        self.model.to(self.device)
        self.trainable_counts = set_trainable(model, args.stage, args.tune_vision_tower)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.optimizer = self._make_optimizer()
        self.total_steps = self._total_steps()
        warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * self.total_steps)
        self.warmup_steps = int(warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, self.warmup_steps, self.total_steps, args.min_lr_ratio))
        self.global_step = 0
        self.epoch = 0
        self.batches_into_epoch = 0  # micro-batches of the current epoch already consumed
        self.log_history: list[dict[str, Any]] = []
        self.skipped_records = 0

    # -- setup ----------------------------------------------------------------------------------------------------

    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.args.precision
        if precision == "fp32":
            return None
        if precision == "bf16":
            return torch.bfloat16
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        args = self.args
        rates = {"model.multi_modal_projector.": args.projector_lr, "model.vision_tower.": args.vision_tower_lr}
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            lr = next((rate for prefix, rate in rates.items() if name.startswith(prefix) and rate is not None),
                      args.learning_rate)
            no_decay = param.ndim < 2 or "norm" in name or "embedding" in name
            groups.setdefault((lr, 0.0 if no_decay else args.weight_decay), []).append(param)
        if not groups:
            raise ValueError(f"stage {args.stage!r} leaves no trainable parameters")
        # fixed group order, so a resumed optimizer state lines up with its groups
        param_groups = [{"params": params, "lr": lr, "weight_decay": wd}
                        for (lr, wd), params in sorted(groups.items(), key=lambda item: item[0])]
        return torch.optim.AdamW(param_groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                 eps=args.adam_epsilon)

    def _micro_batches_per_epoch(self) -> int:
        if self.train_dataset is None:
            return 0
        return math.ceil(len(self.train_dataset) / self.args.per_device_train_batch_size)

    def _total_steps(self) -> int:
        if self.args.max_steps:
            return int(self.args.max_steps)
        per_epoch = self._micro_batches_per_epoch()
        return max(1, math.ceil(per_epoch * self.args.num_train_epochs / self.args.gradient_accumulation_steps))

    def _loader(self, epoch: int, skip_batches: int) -> torch.utils.data.DataLoader:
        bs = self.args.per_device_train_batch_size
        sampler = _EpochSampler(len(self.train_dataset), self.args.seed, epoch, skip_batches * bs,
                                self.args.shuffle)
        return torch.utils.data.DataLoader(
            _SkipTooLong(self.train_dataset), batch_size=bs, sampler=sampler, collate_fn=self._collate,
            num_workers=self.args.dataloader_num_workers,
            persistent_workers=False, prefetch_factor=4 if self.args.dataloader_num_workers else None,
        )

    def _collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor] | None:
        kept = [ex for ex in examples if ex is not None]
        batch = self.collator(kept) if kept else None
        if batch is not None:
            batch["skipped"] = torch.tensor(len(examples) - len(kept))
        return batch

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches forever (epoch after epoch), tracking the position for checkpoints."""
        while True:
            for batch in self._loader(self.epoch, self.batches_into_epoch):
                self.batches_into_epoch += 1
                if batch is None:
                    self.skipped_records += self.args.per_device_train_batch_size
                    continue
                self.skipped_records += int(batch.pop("skipped"))
                yield batch
            self.epoch += 1
            self.batches_into_epoch = 0

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.dtype
        out = {}
        for key, value in batch.items():
            value = value.to(self.device, non_blocking=True)
            if key == "pixel_values":
                value = value.to(dtype)
            out[key] = value
        return out

    # -- training -------------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def training_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over an accumulation window; the loss is normalised by its labelled tokens."""
        self.model.train()
        total_tokens = sum(labelled_token_count(b["labels"]) for b in micro_batches)
        loss_sum = 0.0
        for batch in micro_batches:
            batch = self._to_device(batch)
            with self._autocast():
                loss, _ = token_loss_sum(self.model, batch)
            (loss / max(1, total_tokens)).backward()
            loss_sum += float(loss.detach())
        grad_norm = None
        if self.args.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm))
        lr = self.args.learning_rate * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return {"loss": loss_sum / max(1, total_tokens), "lr": lr, "grad_norm": grad_norm, "tokens": total_tokens}

    def train(self, resume_from_checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
        """Run to ``total_steps`` optimizer steps; return the final metrics."""
        if self.train_dataset is None:
            raise ValueError("Trainer.train needs a train_dataset")
        args = self.args
        if resume_from_checkpoint is not None:
            self.load_checkpoint(self._resolve_checkpoint(resume_from_checkpoint))
        else:
            random.seed(args.seed)
            torch.manual_seed(args.seed)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        bar = _progress(total=self.total_steps, initial=self.global_step, enabled=args.progress,
                        desc=f"train[{args.stage}]")
        batches = self._batches()
        t0 = time.perf_counter()
        window_loss, window_tokens, steps_in_window, last = 0.0, 0, 0, {}
        while self.global_step < self.total_steps:
            window = [next(batches) for _ in range(args.gradient_accumulation_steps)]
            last = self.training_step(window)
            window_loss += last["loss"] * last["tokens"]
            window_tokens += last["tokens"]
            steps_in_window += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
            if args.logging_steps and (self.global_step % args.logging_steps == 0 or
                                       self.global_step == self.total_steps):
                self._log({"step": self.global_step, "epoch": round(self._epoch_float(), 4),
                           "loss": round(window_loss / max(1, window_tokens), 6), "lr": last["lr"],
                           "grad_norm": last["grad_norm"], "seconds": round(time.perf_counter() - t0, 2)}, bar)
                window_loss, window_tokens, steps_in_window = 0.0, 0, 0
            if args.eval_steps and self.eval_dataset is not None and self.global_step % args.eval_steps == 0:
                self._log({"step": self.global_step, **self.evaluate()}, bar)
            if args.save_steps and self.global_step % args.save_steps == 0 and self.global_step < self.total_steps:
                self.save_checkpoint(Path(args.output_dir) / f"checkpoint-{self.global_step}")
                self._rotate_checkpoints()
        bar.close()
        metrics = {"train_loss": last.get("loss"), "steps": self.global_step,
                   "train_seconds": round(time.perf_counter() - t0, 2), "skipped_records": self.skipped_records}
        if self.eval_dataset is not None:
            metrics.update(self.evaluate())
        self._log({"step": self.global_step, **metrics}, None)
        if args.save_final:
            self.save_checkpoint(Path(args.output_dir))
        return metrics

    def _epoch_float(self) -> float:
        per_epoch = self._micro_batches_per_epoch()
        return self.epoch + (self.batches_into_epoch / per_epoch if per_epoch else 0.0)

    def _log(self, entry: dict[str, Any], bar: Any) -> None:
        self.log_history.append(entry)
        line = json.dumps(entry)
        if not self.args.log_to_stderr:
            return
        if bar is not None and self.args.progress:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    # -- evaluation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dataset: torch.utils.data.Dataset | None = None) -> dict[str, float]:
        """Mean token loss on the eval set (the first ``eval_max_batches`` batches)."""
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("no eval_dataset")
        was_training = self.model.training
        self.model.eval()
        loader = torch.utils.data.DataLoader(_SkipTooLong(dataset), batch_size=self.args.per_device_eval_batch_size,
                                             shuffle=False, collate_fn=self._collate)
        total, tokens = 0.0, 0
        for i, batch in enumerate(loader):
            if self.args.eval_max_batches is not None and i >= self.args.eval_max_batches:
                break
            if batch is None:
                continue
            batch.pop("skipped")
            with self._autocast():
                loss, n = token_loss_sum(self.model, self._to_device(batch))
            total += float(loss)
            tokens += n
        self.model.train(was_training)
        return {"eval_loss": round(total / max(1, tokens), 6), "eval_tokens": tokens}

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save_model(self, directory: str | os.PathLike) -> None:
        """The model and processor in the Hugging Face layout."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if self.processor is not None:
            self.processor.save_pretrained(directory)

    def save_checkpoint(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        self.save_model(directory)
        state = {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_into_epoch": self.batches_into_epoch,
            "total_steps": self.total_steps,
            "skipped_records": self.skipped_records,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng_state": torch.get_rng_state(),
            "args": self.args.to_dict(),
        }
        torch.save(state, directory / TRAINER_STATE_NAME)
        readable = {"global_step": self.global_step, "epoch": self._epoch_float(), "total_steps": self.total_steps,
                    "stage": self.args.stage, "trainable_parameters": self.trainable_counts,
                    "log_history": self.log_history}
        (directory / TRAINER_STATE_JSON).write_text(json.dumps(readable, indent=1) + "\n", encoding="utf-8")
        return directory

    def _resolve_checkpoint(self, path: str | os.PathLike) -> Path:
        if str(path) == "latest":
            found = latest_checkpoint(self.args.output_dir)
            if found is None:
                raise FileNotFoundError(f"no checkpoint-<step> directory with {TRAINER_STATE_NAME} in "
                                        f"{self.args.output_dir}")
            return found
        path = Path(path)
        if not (path / TRAINER_STATE_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a trainer checkpoint (no {TRAINER_STATE_NAME})")
        return path

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Weights, optimizer, scheduler, step, data position and RNG state of a checkpoint."""
        from fastllava.models.llava import LlavaForConditionalGeneration

        directory = Path(directory)
        state = torch.load(directory / TRAINER_STATE_NAME, map_location="cpu", weights_only=True)
        loaded = LlavaForConditionalGeneration.from_pretrained(directory, dtype=self.model.dtype)
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [m for m in missing if m not in self.model.tied_parameter_names()]:
            raise ValueError(f"checkpoint {directory} does not fit the model: missing {missing}, "
                             f"unexpected {unexpected}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.batches_into_epoch = int(state["batches_into_epoch"])
        self.skipped_records = int(state.get("skipped_records", 0))
        torch.set_rng_state(state["torch_rng_state"])
        json_path = directory / TRAINER_STATE_JSON
        if json_path.is_file():
            self.log_history = json.loads(json_path.read_text(encoding="utf-8")).get("log_history", [])

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        found = sorted(_checkpoints(self.args.output_dir), key=lambda p: p[0])
        for _, path in found[:-limit]:
            shutil.rmtree(path, ignore_errors=True)


def _checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        match = _CHECKPOINT_DIR.match(child.name)
        if match and (child / TRAINER_STATE_NAME).is_file():
            out.append((int(match.group(1)), child))
    return out


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint-<step>`` directory with the highest step under ``output_dir``, or None."""
    found = _checkpoints(output_dir)
    return max(found)[1] if found else None


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Command line: fastllava train


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastllava train",
        description="Train a LLaVA checkpoint on LLaVA-format data (one stage of the LLaVA-1.5 recipe).")
    p.add_argument("--data", required=True, help="LLaVA-format JSON list (or JSON Lines) of training records")
    p.add_argument("--image-root", help="folder the records' image paths are relative to (default: the JSON's)")
    p.add_argument("--eval-data", help="LLaVA-format JSON for the periodic eval loss")
    p.add_argument("--eval-image-root")
    p.add_argument("--model", required=True, help="checkpoint directory (or hub id in the local cache) to start from")
    p.add_argument("--processor", help="processor directory (default: --model)")
    p.add_argument("--stage", choices=STAGES, default="finetune",
                   help="pretrain: projector only; finetune: projector + text model; full: everything")
    p.add_argument("--tune-vision-tower", action="store_true", help="also train the vision tower (finetune)")
    p.add_argument("--output", required=True, help="output directory (checkpoints and the final model)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 pretrain, 2e-5 finetune/full)")
    p.add_argument("--projector-lr", type=float, help="learning rate of the projector (default: --lr)")
    p.add_argument("--vision-tower-lr", type=float, help="learning rate of a learning vision tower (default: --lr)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=float, default=0.03,
                   help="warmup: a fraction of the steps (< 1) or a number of steps (>= 1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--max-length", type=int, help="cut longer sequences (never inside an image); default: no cut")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int)
    p.add_argument("--eval-max-batches", type=int)
    p.add_argument("--save-steps", type=int)
    p.add_argument("--save-total-limit", type=int)
    p.add_argument("--resume", help="checkpoint directory to continue from, or 'latest' (in --output)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def train_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``fastllava train``: parse ``argv`` and run one stage; returns the final metrics."""
    from fastllava.eval.runner import load_llava_json
    from fastllava.models.llava import LlavaForConditionalGeneration
    from fastllava.processing import AutoProcessor

    args = build_train_parser().parse_args(list(argv) if argv is not None else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    lr = args.lr if args.lr is not None else (1e-3 if args.stage == "pretrain" else 2e-5)
    warmup_steps = int(args.warmup) if args.warmup >= 1 else None
    targs = TrainingArguments(
        output_dir=args.output, stage=args.stage, tune_vision_tower=args.tune_vision_tower,
        num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=lr, projector_lr=args.projector_lr,
        vision_tower_lr=args.vision_tower_lr, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, warmup_ratio=args.warmup if args.warmup < 1 else 0.0,
        warmup_steps=warmup_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size, gradient_accumulation_steps=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing, precision=args.precision, device=args.device,
        num_threads=args.threads, dataloader_num_workers=args.workers, logging_steps=args.logging_steps,
        eval_steps=args.eval_steps, eval_max_batches=args.eval_max_batches, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, seed=args.seed, progress=not args.no_progress,
    )
    resume = args.resume
    model_dir = args.model
    if resume is not None and resume != "latest":
        model_dir = resume  # weights come from the checkpoint anyway; its config is the model's
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.processor or args.model)
    data_path = Path(args.data)
    collator = LlavaCollator(processor, image_root=args.image_root or data_path.parent, max_length=args.max_length)
    train_dataset = LlavaDataset(load_llava_json(data_path), collator)
    eval_dataset = None
    if args.eval_data:
        eval_path = Path(args.eval_data)
        eval_collator = LlavaCollator(processor, image_root=args.eval_image_root or eval_path.parent,
                                      max_length=args.max_length)
        eval_dataset = LlavaDataset(load_llava_json(eval_path), eval_collator)
    trainer = Trainer(model, processor, targs, train_dataset, eval_dataset, data_collator=collator)
    metrics = trainer.train(resume_from_checkpoint=resume)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    train_main()
