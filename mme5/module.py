"""The LightningModule: contrastive fine-tuning of an MLLM embedder, with or without the gradient cache.

Optimisation is manual in both modes, so that the cached step (one backward per chunk, one optimiser step
per batch) and the plain step share one loop: zero grads → backward(s) → clip → step → schedule.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from mme5 import checkpoint as ckpt_format
from mme5 import warm_start
from mme5.backbones import (
    DTYPES,
    InputFormat,
    family_of,
    load_backbone,
    load_backbone_skeleton,
    load_processing,
    resolve_preset,
)
from mme5.backbones.presets import DEFAULT as DEFAULT_PRESET
from mme5.contrastive import contrastive_step, temperature_group_rows
from mme5.data.collate import ContrastiveBatch
from mme5.data.schema import Task
from mme5.distributed import GradientSync, from_all_ranks
from mme5.encoder import Encoder, LoraSettings
from mme5.files import write_json
from mme5.gradcache import GradCache
from mme5.health import batch_health
from mme5.hub import local_model
from mme5.losses import ContrastiveOutput, InfoNCE
from mme5.matryoshka import Matryoshka, MatryoshkaOutput
from mme5.sharding import load_from_rank0, shard_encoder, shards_parameters

DATA_REPORT = "data_report.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good state was saved before stopping."""


def warmup_then_decay(step: int, warmup: int, total: int, schedule: str, warmup_shape: str = "linear"
                      ) -> float:
    """Learning-rate factor of optimizer step `step` (0-based): warmup to 1, then decay to 0 at `total`.

    "linear" is transformers' `get_{linear,cosine,constant}_schedule_with_warmup`: step / warmup, so the
    first step runs at 0. "log" is DeepSpeed's WarmupDecayLR (the mmE5 reference's scheduler) as its engine
    steps it, after each optimizer step: step k gets its gamma(k - 1), log(k) / log(warmup) with a warmup of
    at least 2, and the decay lags one step too. Step 0 runs at 0, as in DeepSpeed >= 0.15.3; the
    reference's 0.14.4 runs it at the peak (the optimizer's initial lr; DeepSpeed issue 6569).
    """
    if warmup_shape == "log":
        if step == 0:
            return 0.0
        step, warmup = step - 1, max(2, warmup)
        if step < warmup:
            return math.log(step + 1) / math.log(warmup)
    elif step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "constant":
        return 1.0
    return 1.0 - progress


def warmup_steps(warmup: float, total: int) -> int:
    """Warmup length: a fraction (< 1) of `total` rounded up, as transformers' `get_warmup_steps` for
    `warmup_ratio` (float product included: 0.07 x 100 gives 8), or a number of steps (>= 1)."""
    return math.ceil(total * warmup) if warmup < 1 else int(warmup)


class EmbeddingModule(L.LightningModule):
    """Trains an `Encoder` with InfoNCE over gathered positives and hard negatives.

    Args:
        backbone: model folder or hub id (loaded with `from_pretrained`).
        input_format: how items become model inputs (max_length, image token, resolution); the data module
            collates with the same (train.py links them), and checkpoints record it for evaluation.
        attn_implementation: the backbone's attention kernel ("sdpa", "flash_attention_2", "eager"; null:
            transformers' default).
        lora: LoRA/DoRA settings (the paper's by default); null trains the full backbone.
        dtype: weights' dtype when loading (null: the checkpoint's); mixed precision is the Trainer's.
        gradient_checkpointing: recompute activations in the backward (non-reentrant).
        temperature: InfoNCE temperature (the paper's 0.02).
        mask_false_negatives: leave out of each query's softmax the in-batch candidates (any rank's) whose
            content equals its own positive's, e.g. the same label text; false (the reference) counts them as
            negatives.
        learnable_temperature: learn log(1/temperature), starting from `temperature`.
        hardness_mode: add hardness_strength · stop_grad(cosine) to these negatives' logits (sentence-
            transformers' `MultipleNegativesRankingLoss`; Lan et al. 2025): "in_batch_negatives" (other
            samples' positives), "hard_negatives" (the query's own), "all_negatives"; null: off.
        hardness_strength: that α (RzenEmbed: 9 on in-batch negatives; EmbeddingGemma: 5 on hard negatives).
        false_negative_threshold: drop from a query's softmax a candidate whose cosine to the query's positive
            exceeds this (RzenEmbed: 0.95); null: off.
        false_negative_margin: drop a candidate the query scores above its positive + this, in cosine
            (Qwen3-VL-Embedding: 0.1); null: off.
        task_temperatures: one learnable temperature per group (RzenEmbed), starting from `temperature`;
            the groups are the task types, or the values of `temperature_groups`. Replaces
            learnable_temperature.
        temperature_groups: {source: group} for `task_temperatures`; null: each sample's task type.
        matryoshka_dims: also train each of these leading sizes of the embedding as an embedding (the loss
            summed over the prefixes, each normalised; `mme5.matryoshka`), e.g. [4096, 1024, 512, 256].
        matryoshka_weights: one weight per dimension of `matryoshka_dims` (null: 1 each, as
            sentence-transformers' MatryoshkaLoss).
        gradient_cache: chunked two-pass backward; memory bounded by `chunk_size` for any batch size.
        chunk_size: items per encoder forward (the data module collates chunks of this size).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup: warmup length, as a fraction of max_steps (< 1, rounded up as transformers' `warmup_ratio`)
            or a number of steps (>= 1).
        warmup_shape: "linear" (transformers' schedulers), or "log" as DeepSpeed's WarmupDecayLR (the mmE5
            reference's; see `warmup_then_decay`).
        schedule: decay after warmup.
        grad_clip: maximum gradient norm (0 = no clipping).
        gradient_scale: "global" (the gradient of the global-batch loss) or "per_rank" (the reference's
            arithmetic: each rank's loss covers the global batch but only its own embeddings carry gradient,
            and the ranks' gradients are averaged, so the gradient is the global one divided by the number
            of ranks; this scales the learning rate, and clipping, by that factor).
        reshard_after_forward: under FSDP (`ModelParallelStrategy`), free each gathered block after its
            forward (least memory); false keeps it until its backward (less communication).
        init_from: start from this trained model's weights, a checkpoint (.ckpt) of train.py or mme5.merge on
            the same backbone, instead of the backbone's: a second stage. The optimiser, schedule and data
            start afresh (`mme5.warm_start` says what may start from what); null: the backbone's weights.
    """

    def __init__(
        self,
        backbone: str,
        input_format: InputFormat | None = None,
        attn_implementation: str | None = None,
        lora: LoraSettings | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        gradient_checkpointing: bool = True,
        temperature: float = 0.02,
        learnable_temperature: bool = False,
        mask_false_negatives: bool = False,
        hardness_mode: Literal["in_batch_negatives", "hard_negatives", "all_negatives"] | None = None,
        hardness_strength: float = 0.0,
        false_negative_threshold: float | None = None,
        false_negative_margin: float | None = None,
        task_temperatures: bool = False,
        temperature_groups: dict[str, str] | None = None,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
        gradient_cache: bool = True,
        chunk_size: int = 16,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup: float = 0.05,
        warmup_shape: Literal["linear", "log"] = "linear",
        schedule: Literal["linear", "cosine", "constant"] = "linear",
        grad_clip: float = 5.0,
        gradient_scale: Literal["global", "per_rank"] = "global",
        reshard_after_forward: bool = True,
        init_from: str | None = None,
    ):
        super().__init__()
        # Plain types in checkpoints: they then load with torch.load(weights_only=True).
        lora = asdict(lora) if isinstance(lora, LoraSettings) else lora  # noqa: F841 (saved below)
        input_format = asdict(InputFormat.of(input_format))  # noqa: F841 (saved below)
        self.save_hyperparameters()
        self.automatic_optimization = False
        if temperature_groups and not task_temperatures:
            raise ValueError("model.temperature_groups is set but model.task_temperatures is false")
        groups = sorted(set(temperature_groups.values())) if temperature_groups else [str(t) for t in Task]
        self.loss_fn = InfoNCE(temperature, learnable_temperature, mask_false_negatives=mask_false_negatives,
                               hardness_mode=hardness_mode, hardness_strength=hardness_strength,
                               false_negative_threshold=false_negative_threshold,
                               false_negative_margin=false_negative_margin,
                               temperature_groups=groups if task_temperatures else None)
        self.cache = GradCache(chunk_size, backward=self.manual_backward)
        self.matryoshka = Matryoshka.of(matryoshka_dims, matryoshka_weights)
        self.encoder: Encoder | None = None
        self._last_step_end: float | None = None
        self._sync = GradientSync()  # chosen in `on_fit_start`, once the strategy has wrapped the model
        self._backbone: dict[str, str] | None = None  # its identity, read once
        # train.py sets it when resuming: the checkpoint's weights replace init_from's, then not read at all.
        self.resuming = False
        self._initialised_from: dict[str, Any] | None = None  # what init_from started from, for checkpoints

    def configure_model(self) -> None:
        """Load the backbone (once; Lightning calls this under the strategy's init context)."""
        if self.encoder is not None:
            return
        hp = self.hparams
        dtype = DTYPES[hp.dtype] if hp.dtype else None
        mesh = self._device_mesh  # set by ModelParallelStrategy: shard with FSDP2
        # Sharded, only rank 0 reads the weights; the other ranks build the architecture alone and receive
        # their shards from rank 0 (`load_from_rank0`).
        load = load_backbone_skeleton if mesh is not None and dist.get_rank() != 0 else load_backbone
        options = {"attn_implementation": hp.attn_implementation} if hp.attn_implementation else {}
        adapter = load(hp.backbone, dtype, input_format=InputFormat.of(hp.input_format), **options)
        lora = LoraSettings(**hp.lora) if hp.lora is not None else None
        self.encoder = Encoder(adapter, lora, gradient_checkpointing=hp.gradient_checkpointing)
        if self.encoder.has_adapters:
            self.register_state_dict_post_hook(ckpt_format.drop_frozen_weights)
            self.strict_loading = False  # the backbone's weights come from `backbone`, not the checkpoint
        self.encoder.train()  # from_pretrained returns eval mode; LoRA dropout must be active in training
        if hp.init_from and not self.resuming and (mesh is None or dist.get_rank() == 0):
            self._initialised_from = warm_start.load_start(self.encoder, hp.init_from, self.check_init_from(),
                                                           hp.backbone, hp.dtype)
        if mesh is not None:
            self._shard(mesh)

    def _shard(self, mesh: Any) -> None:
        hp = self.hparams
        full_state = self.encoder.state_dict() if dist.get_rank() == 0 else {}  # before it is sharded
        compute_dtype = DTYPES[hp.dtype] if hp.dtype in ("bfloat16", "float16") else None
        shard_encoder(self.encoder, self.encoder.adapter.model, mesh, param_dtype=compute_dtype,
                      reshard_after_forward=hp.reshard_after_forward)
        load_from_rank0(self.encoder, full_state, mesh)

    # ------------------------------------------------------------------ training

    def on_fit_start(self) -> None:
        # Replicated parameters' gradients are averaged by `average_gradients`; sharded ones by FSDP2,
        # applied in `configure_model`. Other wrappers would average them a second time or not at all.
        strategy = self.trainer.strategy
        supported = isinstance(strategy, SingleDeviceStrategy | DDPStrategy) or shards_parameters(strategy)
        if not supported or isinstance(strategy, DeepSpeedStrategy | FSDPStrategy):
            raise NotImplementedError(
                f"trainer.strategy {type(strategy).__name__} is not supported by EmbeddingModule; use a "
                "single device, 'ddp', or FSDP2 through lightning.pytorch.strategies.ModelParallelStrategy"
            )
        self._sync = GradientSync.for_run(strategy.model, self.encoder, self.encoder.has_adapters)
        self.cache.no_sync = self._sync.between_chunks

    def on_train_start(self) -> None:
        self._apply_optimiser_settings()

    def _apply_optimiser_settings(self) -> None:
        """Make the optimiser and scheduler follow this run's `lr` and `weight_decay`.

        A resumed run restores both from its checkpoint, including the learning rate the checkpoint was
        trained with: without this, `--ckpt_path last --model.lr 1e-5` would go on at the old rate. The
        schedule's position (`last_epoch`) is kept; the rate at this step is recomputed from the new peak.
        """
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
        scheduler.base_lrs = [self.hparams.lr] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = self.hparams.lr
            group["weight_decay"] = self.hparams.weight_decay
            group["lr"] = self.hparams.lr * factor(scheduler.last_epoch)

    def training_step(self, batch: ContrastiveBatch, batch_idx: int) -> Tensor:
        started = time.perf_counter()
        data_wait = started - self._last_step_end if self._last_step_end is not None else 0.0
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)

        with self._sync.step(self.parameters()):  # leaves the global-batch gradient on every rank
            loss, output = contrastive_step(
                self.encoder.encode_chunk, batch.query, batch.positive, batch.negatives, batch.negative_mask,
                self.loss_fn, self.cache if self.hparams.gradient_cache else None, self.manual_backward,
                batch.positive_keys, self.temperature_rows(batch), self.matryoshka)

        self._stop_if_not_finite(loss)
        if self.hparams.gradient_scale == "per_rank" and self.trainer.world_size > 1:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / self.trainer.world_size)
        if self.hparams.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip,
                                gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()

        elapsed = time.perf_counter() - started
        self._log_step(batch, loss, output, data_wait, elapsed)
        self._last_step_end = time.perf_counter()
        return loss

    def temperature_rows(self, batch: ContrastiveBatch) -> Tensor | None:
        """(B,) each sample's temperature group (`task_temperatures`), else None."""
        mapping = self.hparams.temperature_groups
        return temperature_group_rows(self.loss_fn, batch.tasks, batch.sources, mapping)

    def _stop_if_not_finite(self, loss: Tensor) -> None:
        bad = not bool(torch.isfinite(loss))
        if not self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        # The optimiser has not stepped yet: weights, optimiser and scheduler are the last good state.
        self.optimizers().zero_grad(set_to_none=True)
        path = ckpt_format.run_checkpoint_dir(self.trainer) / "last-good.ckpt"
        self.trainer.save_checkpoint(path)
        raise NonFiniteLossError(
            f"loss is {loss.item()} at global step {self.global_step}; the state before this step is saved "
            f"in {path}. Resume with --ckpt_path {path} after lowering the learning rate or checking the data"
        )

    def on_train_end(self) -> None:
        """The data's skip report beside the run's logs (`data_report.json`), every rank's counts."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "skip_report"):
            return
        report = datamodule.skip_report()
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / DATA_REPORT
            write_json(path, report)
            if report.get("truncated_items"):
                rank_zero_warn(f"{report['truncated_items']} training items were cut to max_length "
                               f"{report.get('max_length')} tokens; see {path}")
            if report["skipped_samples"]:
                rank_zero_warn(f"{report['skipped_samples']} training samples were skipped or lost; see "
                               f"{path}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Random state too, so a resumed run draws the same (LoRA) dropout masks as an uninterrupted one;
        # every rank's, since ranks draw differently (their chunks differ in number and content).
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        rng_states = from_all_ranks({"torch": torch.get_rng_state(), "cuda": cuda})
        adapters = self._trainable_names() if self.encoder is not None and self.encoder.has_adapters else None
        ckpt_format.add_training_state(checkpoint, rng_states, adapters, self.backbone_identity())
        if self._initialised_from is not None:
            checkpoint[warm_start.INITIALISED_FROM] = self._initialised_from
        if self._trainer is not None:
            checkpoint[ckpt_format.MAX_STEPS] = self.trainer.max_steps

    def _trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def backbone_identity(self) -> dict[str, str]:
        if self._backbone is None:
            self._backbone = ckpt_format.backbone_identity(local_model(self.hparams.backbone))
        return self._backbone

    def check_input_format(self) -> None:
        """Refuse (ValueError) an input format the backbone cannot apply: a preset of another family, a
        `max_grid_side` without an anyres grid, a `max_length` shorter than the preset's frame. Checked
        by the processing-only adapter, which the model's will agree with, so a run can refuse before it
        writes anything."""
        load_processing(self.hparams.backbone, InputFormat.of(self.hparams.input_format))

    def check_init_from(self) -> dict[str, Any] | None:
        """`init_from`'s checkpoint (memory-mapped), refused (ValueError) when this run cannot start from it;
        None without one. Checked again when loading, so a run can refuse before it writes anything."""
        hp = self.hparams
        if not hp.init_from:
            return None
        checkpoint = warm_start.read_start(hp.init_from)
        warm_start.check_start(hp.init_from, checkpoint, self.backbone_identity(), hp.lora)
        return checkpoint

    def backbone_family(self) -> str:
        return family_of(local_model(self.hparams.backbone))

    def detected_preset(self) -> str:
        """The preset an input format naming none trains with on this backbone: the one its files say
        (`mme5.backbones.presets.detect`), else the default."""
        folder = local_model(self.hparams.backbone)
        return resolve_preset(folder, InputFormat(), family_of(folder)).preset or DEFAULT_PRESET

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ckpt_format.check_backbone(checkpoint, self.backbone_identity())
        ckpt_format.check_adapters(checkpoint, self._trainable_names())
        self._initialised_from = checkpoint.get(warm_start.INITIALISED_FROM)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer else (0, 1)
        state = ckpt_format.rng_state_of_rank(checkpoint, rank, world)
        if state is not None:
            torch.set_rng_state(state["torch"])
            if state["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])

    def _log_step(self, batch: ContrastiveBatch, loss: Tensor, output: ContrastiveOutput, data_wait: float,
                  elapsed: float) -> None:
        world = self.trainer.world_size
        metrics = {
            "train/loss": loss,
            "train/accuracy": output.accuracy,
            "train/temperature": output.temperature,
            "train/lr": self.lr_schedulers().get_last_lr()[0],
            "train/samples_per_sec": batch.size * world / max(elapsed + data_wait, 1e-9),
            "train/data_wait_sec": data_wait,
            "train/step_sec": elapsed,
        }
        if output.false_negatives is not None:
            metrics["train/false_negatives"] = output.false_negatives  # masked candidates a query, any rule
        metrics |= {f"train/false_negatives/{rule}": n for rule, n in output.false_negatives_by_rule.items()}
        metrics |= {f"train/temperature/{group}": t for group, t in self.loss_fn.group_temperatures().items()}
        if isinstance(output, MatryoshkaOutput):
            metrics |= {f"train/loss_dim{dim}": value for dim, value in output.dim_losses.items()}
        metrics |= batch_health(output)  # over the global batch, the same on every rank (HealthMonitor)
        self.log_dict(metrics, prog_bar=False, on_step=True, on_epoch=False, batch_size=batch.size)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, logger=False,
                 batch_size=batch.size)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "num_skipped"):
            self.log("data/skipped_samples", float(datamodule.num_skipped), on_step=True, on_epoch=False,
                     batch_size=batch.size)

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError("set trainer.max_steps: the training stream is unbounded")
        warmup = warmup_steps(hp.warmup, int(total))
        scheduler = LambdaLR(optimizer, lambda step: warmup_then_decay(step, warmup, int(total), hp.schedule,
                                                                       hp.warmup_shape))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
