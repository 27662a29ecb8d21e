"""Lightning callbacks that run MMEB / MMEB-V2 / XTD on the model being trained and log the scores to
TensorBoard (wired in through the recipe's `trainer.callbacks`, as below).

    trainer:
      callbacks:
        - class_path: mme5.eval.callbacks.MMEBEval
          init_args: {root: runs/demo/world/mmeb, every_n_steps: 100, max_queries: 50}
        - class_path: mme5.eval.callbacks.XTDEval
          init_args: {root: runs/demo/world/xtd, every_n_steps: 100, max_queries: 100}
        - class_path: mme5.eval.callbacks.MMEBV2Eval
          init_args: {root: data/MMEB-V2, modalities: [visdoc], every_n_steps: 500, max_queries: 50}

Same code as the command (`mme5.eval.run.evaluate`), on the first `max_queries` queries of each data set,
without the disk cache (the weights change between runs). Under DDP and FSDP every rank encodes a share of
the items and gets all embeddings back (`Encoder.embed` runs lockstep batches under FSDP); rank 0 logs.
Tags: `eval/mmeb/<Subset>`, `eval/mmeb/<Aggregate>`, `eval/mmeb-v2/<Subset>`, `eval/mmeb-v2/<meta-task or
modality>`, `eval/xtd/<lang>_r10`, `eval/xtd/mean_r10`, ... (see the benchmarks' `summarize`), at the
global step.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from mme5.eval.mmeb import MMEB
from mme5.eval.mmeb_v2.benchmark import MMEBV2
from mme5.eval.mmeb_v2.registry import MODALITIES
from mme5.eval.retrieval import RetrievalSet
from mme5.eval.run import Benchmark, evaluate
from mme5.eval.xtd import IMAGE_INSTRUCTION, TEXT_INSTRUCTION, XTD

HEADLINE = ("Overall", "mean_over_sets", *MODALITIES, "mean_r10")  # the scalars a run prints


class BenchmarkCallback(L.Callback, ABC):
    """Evaluates `pl_module.encoder` every `every_n_steps` optimizer steps (and at train start).

    The data sets are read once, at setup; the encoder runs in eval mode under the trainer's precision
    context and returns to its former mode afterwards.
    """

    def __init__(self, every_n_steps: int, at_train_start: bool, batch_size: int, progress: bool):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, found {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.at_train_start = at_train_start
        self.batch_size = batch_size
        self.progress = progress
        self._benchmark: Benchmark | None = None
        self._sets: list[RetrievalSet] = []
        self._last_step: int | None = None
        self.latest: dict[str, float] = {}  # the metrics of the last evaluation

    @abstractmethod
    def build(self) -> Benchmark:
        """The benchmark on the callback's data (called once, at setup)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._benchmark is None:
            self._benchmark = self.build()
            self._sets = list(self._benchmark.sets())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_start:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate now and log at the current global step; returns the logged metrics."""
        self._last_step = trainer.global_step
        encoder = pl_module.encoder
        was_training = encoder.training
        started = time.perf_counter()
        encoder.eval()
        try:
            with trainer.precision_plugin.forward_context():
                summary, _ = evaluate(self._benchmark, encoder.embed, sets=self._sets,
                                      batch_size=self.batch_size, progress=self.progress)
        finally:
            encoder.train(was_training)
        name = self._benchmark.name
        metrics = {f"eval/{name}/{key}": value for key, value in summary.scalars.items()}
        metrics[f"eval/{name}/seconds"] = time.perf_counter() - started
        self.latest = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            headline = {k: v for k, v in summary.scalars.items() if k in HEADLINE}
            rank_zero_info(f"step {trainer.global_step}: {name} " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                             headline.items()))
        return metrics


class MMEBV2Eval(BenchmarkCallback):
    """MMEB-V2 during training.

    Args:
        root: MMEB-V2 folder (as `mme5.data.fetch --dataset mmeb-v2` writes it).
        subsets: data sets to run (default: all of `modalities`).
        modalities: "image", "video", "visdoc" (default: all three).
        max_queries: first N queries of each data set.
        every_n_steps: evaluate every N optimizer steps.
        at_train_start: also evaluate before the first step (the untrained baseline, step 0).
        batch_size: items per encoder forward.
        progress: show progress bars.
    """

    def __init__(self, root: str, subsets: Sequence[str] | None = None,
                 modalities: Sequence[str] | None = None, max_queries: int | None = 100,
                 every_n_steps: int = 500, at_train_start: bool = True, batch_size: int = 16,
                 progress: bool = False):
        super().__init__(every_n_steps, at_train_start, batch_size, progress)
        self.root, self.subsets, self.modalities, self.max_queries = root, subsets, modalities, max_queries

    def build(self) -> Benchmark:
        return MMEBV2(self.root, self.subsets, self.modalities, self.max_queries)


class MMEBEval(BenchmarkCallback):
    """MMEB (or the demo world's copy) during training.

    Args:
        root: MMEB-eval folder (one sub-folder per data set; subsets.json used when present).
        subsets: data sets to run (default: all of the registry).
        images: image folders or .zip files (default: `root` and its .zip files).
        max_queries: first N queries of each data set.
        every_n_steps: evaluate every N optimizer steps.
        at_train_start: also evaluate before the first step (the untrained baseline, step 0).
        batch_size: items per encoder forward.
        progress: show progress bars.
    """

    def __init__(self, root: str, subsets: Sequence[str] | None = None, images: Sequence[str] | None = None,
                 max_queries: int | None = 100, every_n_steps: int = 500, at_train_start: bool = True,
                 batch_size: int = 16, progress: bool = False):
        super().__init__(every_n_steps, at_train_start, batch_size, progress)
        self.root, self.subsets, self.images, self.max_queries = root, subsets, images, max_queries

    def build(self) -> Benchmark:
        return MMEB(self.root, self.subsets, self.images, self.max_queries)


class XTDEval(BenchmarkCallback):
    """XTD during training.

    Args:
        root: XTD folder (XTD10 files, or the row format).
        languages: languages to run (default: all present).
        images: image folders or .zip files (default: `root` and its .zip files).
        max_queries: first N images and their captions.
        every_n_steps: evaluate every N optimizer steps.
        at_train_start: also evaluate before the first step (the untrained baseline, step 0).
        batch_size: items per encoder forward.
        text_instruction: instruction of the caption queries.
        image_instruction: instruction of the image candidates.
        progress: show progress bars.
    """

    def __init__(self, root: str, languages: Sequence[str] | None = None, images: Sequence[str] | None = None,
                 max_queries: int | None = 100, every_n_steps: int = 500, at_train_start: bool = True,
                 batch_size: int = 16, text_instruction: str = TEXT_INSTRUCTION,
                 image_instruction: str = IMAGE_INSTRUCTION, progress: bool = False):
        super().__init__(every_n_steps, at_train_start, batch_size, progress)
        self.root, self.languages, self.images, self.max_queries = root, languages, images, max_queries
        self.text_instruction, self.image_instruction = text_instruction, image_instruction

    def build(self) -> Benchmark:
        return XTD(self.root, self.languages, self.images, self.max_queries, self.text_instruction,
                   self.image_instruction)
