"""A sentence-transformers module that embeds exactly as `mme5.Embedder` does, so that an exported folder
loads with the real package:

    model = SentenceTransformer("exported/x", trust_remote_code=True)
    q = model.encode_query(["a red cube"])          # the export's query instruction
    d = model.encode_document([Image.open("cube.png"), {"text": "a cube", "image": "cube.png"}])

sentence-transformers' own `Transformer` module cannot reproduce the project's prompt rule (the published
format, Mllama's image/bos head, Qwen2-VL's bare image token, the preset's truncation rule) nor Mllama's mixed
batches, so the export names this module in `modules.json`; sentence-transformers 6 asks
`trust_remote_code=True` for any module outside its own namespace. The module wraps the project's `Encoder`
(last-token pooling, L2 normalisation inside) and turns sentence-transformers' prompt into the instruction
of the published format. Inputs follow sentence-transformers' conventions: a string naming an existing
image file, an image URL or a data URI is an image, as in `Embedder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.modules.input_module import InputModule

from mme5.backbones import DTYPES
from mme5.checkpoint import load_encoder, save_model_folder, trained_dims
from mme5.embedder import to_item
from mme5.encoder import Encoder, decoded


class MME5Embedding(InputModule):
    """The whole model as one sentence-transformers input module: inputs → `sentence_embedding`."""

    save_in_root = True

    def __init__(self, encoder: Encoder, recipe: dict[str, Any] | None = None):
        super().__init__()
        self.encoder = encoder.eval()
        self.recipe = recipe or {}

    @property
    def modalities(self) -> list[Any]:
        # "message" lets a batch mix modalities (sentence-transformers calls a mixed batch a message batch);
        # chat-message dicts themselves are refused by `to_item`.
        return ["text", "image", ("image", "text"), "message"]

    @property
    def tokenizer(self) -> Any:
        return self.encoder.adapter.tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.encoder.adapter.max_length

    def get_embedding_dimension(self) -> int:
        return self.encoder.dim

    def preprocess(self, inputs: list[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """One processor batch; sentence-transformers' prompt is the published format's instruction."""
        num_frames = self.encoder.adapter.input_format.num_frames
        items = [to_item(value, f"input {value!r:.80}", prompt or "", num_frames) for value in inputs]
        return dict(self.encoder.adapter.collate([decoded(item, num_frames) for item in items]))

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        inputs = {key: value for key, value in features.items() if isinstance(value, torch.Tensor)}
        features["sentence_embedding"] = self.encoder(inputs)
        return features

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             model_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> MME5Embedding:
        folder = cls.load_dir_path(model_name_or_path, subfolder, token, cache_folder, revision,
                                   local_files_only)
        dtype = (model_kwargs or {}).get("dtype", (model_kwargs or {}).get("torch_dtype"))
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if dtype not in (None, "auto", *DTYPES):
            raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        loaded = load_encoder(folder, dtype=None if dtype == "auto" else dtype)
        return cls(loaded.encoder, loaded.recipe)

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        save_model_folder(Path(output_path), self.encoder, self.recipe.get("instructions") or {},
                          self.recipe.get("source") or {}, matryoshka_dims=trained_dims(self.recipe))
