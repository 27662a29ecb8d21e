"""Bridges to the tools people load embedding models with: sentence-transformers
(`mme5.integrations.sentence_transformers`) and mteb (`mme5.integrations.mteb`). Those modules import their
package; this one does not, so that an export writes their files without them (`pip install
'mme5[integrations]'` to use them).
"""

from pathlib import Path

from mme5.files import write_json

SENTENCE_TRANSFORMERS_MODULE = "mme5.integrations.sentence_transformers.MME5Embedding"


def write_sentence_transformers_files(folder: Path, instructions: dict[str, str]) -> None:
    """`modules.json` naming the project's module, and `config_sentence_transformers.json` with the query and
    document instructions as the named prompts `encode_query` / `encode_document` use."""
    module = {"idx": 0, "name": "0", "path": "", "type": SENTENCE_TRANSFORMERS_MODULE}
    write_json(folder / "modules.json", [module])
    write_json(folder / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer",
        "prompts": {"query": instructions.get("query", ""), "document": instructions.get("target", "")},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })
