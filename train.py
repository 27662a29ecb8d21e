"""Train an mmE5-style embedding model.

    python train.py fit --config configs/demo.yaml                 # the embedded default, on CPU
    python train.py fit --config configs/demo.yaml --ckpt_path last   # resume the latest run
    python train.py fit --config configs/mme5_llama32v_11b.yaml    # the paper's recipe (GPUs)

Global contrastive batch = data.batch_size × trainer.devices × trainer.num_nodes; every query is scored
against all of those positives plus its own `data.num_negatives` hard negatives. The gradient cache
(model.gradient_cache) keeps memory at one chunk of `model.chunk_size` items whatever the batch size.
"""

from lightning.pytorch.cli import LightningCLI

from mme5.data.datamodule import ShardDataModule
from mme5.module import EmbeddingModule


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One backbone and one chunk size for both: the data module collates with the model's processor,
        # in chunks of the size the gradient cache encodes.
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.chunk_size", "data.chunk_size")


def main(args=None) -> None:
    TrainCLI(
        EmbeddingModule,
        ShardDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,  # AdamW + warmup/decay come from the model's own settings
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
