"""Row layouts the converter reads besides the published one: VLM2Vec-V2's video and visual-document
training sets, each turned into published rows (`qry`, `qry_video_path`, `pos_text`, ...) by the rule the
reference's dataset parser applies (`mme5.data.convert --format NAME`; your own pairs: `mme5.data.pairs`).

    vlm2vec-video-caption    llavahound_caption, data_mode caption_retrieval: the video and the first turn
                             → the second turn (V2T)
    vlm2vec-video-retrieval  llavahound_caption, data_mode video_retrieval: the second turn as a caption →
                             the video (T2V)
    vlm2vec-video-qa         llavahound_qa: the video and the question → the answer (VT2T)
    vlm2vec-colpali          vidore/colpali_train_set: the page and the query → the answer (IT2T)
    vlm2vec-visrag           openbmb/VisRAG-Ret-Train-In-domain-data: the query, under its source's prompt →
                             the page, under its source's description (T2I)

The video sets are JSONL rows `{id, video, conversations}` (LLaVA-Hound's `video_caption_300k.jsonl` and
`video_240k_caption_15k.jsonl`) whose `video` names a frames folder under the frame base directory
(`--images`, the yaml's `video_frame_basedir`); every frame is stored, the reference's `num_frames` sampling
happens at encode time. The page sets are Hugging Face datasets (parquet folders, `save_to_disk` folders or
hub ids) with an `image` column. Strings are the reference's, with the published placeholder `<|image_1|>`
where it writes the family's image or video token (a family adapter puts its own back, `mme5.published`).
Read in TIGER-AI-Lab/VLM2Vec at commit 6e1e1d4: `experiments/public/train/train_{video,visdoc}.yaml` and
`src/data/dataset/{llavahound_dataset_caption,llavahound_dataset_qa,vidore_dataset,visrag_dataset}.py`.

Where the converter's rules differ from the reference's, the converter's hold and are counted in its report:
a first turn without `<video>` keeps its video (`missing_image_token`; the reference's Qwen2-VL collator
drops the frames of a text without the video token), and a VisRAG page of a source without a description
gets the published image instruction (`image_instruction_added`; the reference writes " <image token>").
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from mme5.data.inputs import BadRow
from mme5.data.schema import Modality, Task
from mme5.published import PLACEHOLDER


class RowLayout(Protocol):
    """What the converter asks of a row layout that is not the published one (`PairFormat`, `V2Layout`)."""

    name: str
    """How messages name the layout ("pairs", "vlm2vec-colpali")."""
    task: Task | None
    """The samples' task unless --task says otherwise (None: from the source name, as published rows)."""
    source: str | None
    """The samples' source unless --source says otherwise (None: each file's parent folder)."""
    ignored_columns: tuple[str, ...]
    """Columns of the published layout that the reference leaves unread: listed as unread, never refused."""
    refuses_unread: bool
    """Whether any other column is refused (the user's own pairs) or only a near miss of a read one."""

    def description(self) -> Any:
        """What the manifest records of the layout (part of the conversion's identity)."""

    def known_columns(self) -> list[str]:
        """The columns the layout reads."""

    def missing(self, names: Collection[str]) -> list[str]:
        """The required columns absent from `names`."""

    def row(self, row: Mapping[str, Any], parse_list: Callable[..., list[Any]]) -> dict[str, Any]:
        """The published row of one of the layout's rows (a BadRow naming the layout's field if none)."""

    def user_field(self, published_field: str) -> str:
        """The layout's field behind a published row's field: what a message about a bad row names."""


# ----------------------------------------------------------------------------- the reference's strings

VIDEO_TOKEN = "<video>"
"""LLaVA-Hound's video token in the first turn, replaced by the model's."""
VIDEO_QA_PROMPT = "Answer a question based on the content of a video. "  # QA_QUERY_PROMPT
CAPTION_QUERY_PROMPT = "Find a video that contains the following visual content: "  # VRET_QRY_PROMPT
VIDEO_TARGET_PROMPT = "Understand the content of the provided video: "  # VRET_TGT_PROMPT

# visrag_dataset.py: query_source2prompt (put before the query) and target_source2prompt (before the page).
VISRAG_QUERY_PROMPTS = {
    "NeurIPS Papers": "This query is about a research paper from NeurIPS, a leading AI/ML conference. The "
                      "document contains technical discussions, methodologies, and findings. Identify "
                      "relevant papers and sections that address the query: ",
    "Textbooks": "This query is related to a college-level textbook, which provides structured "
                 "explanations, definitions, and examples. Find the most relevant concepts or explanations "
                 "that address the query: ",
    "ICML Papers": "This query is about a research paper from ICML, a leading AI/ML conference. The "
                   "document contains theoretical insights, experiments, and applications. Identify "
                   "relevant papers and sections that best answer the query: ",
    "Manuallib": "This query pertains to a product manual, which contains detailed technical "
                 "specifications, usage instructions, and troubleshooting steps. Find the most relevant "
                 "section that answers the query: ",
    "ArxivQA": "This query is related to retrieving a relevant figure from an ArXiv research paper. The "
               "retrieved figure should contain scientific plots, mathematical visualizations, or "
               "experimental results that best address the query: ",
    "ChartQA": "This query is related to retrieving a relevant chart that visually represents numerical or "
               "categorical data. The retrieved chart should contain bar graphs, line charts, or other "
               "visual elements necessary to analyze trends, compare values, or extract insights related "
               "to the query: ",
    "MP-DocVQA": "This query is related to retrieving a relevant page from a multi-page document, such as "
                 "reports, invoices, or research papers. The retrieved document should contain text, "
                 "tables, or structured information necessary to answer the query: ",
    "InfoVQA": "This query is related to retrieving an infographic that visually presents statistical or "
               "factual information using charts, icons, and structured layouts. The retrieved image "
               "should contain the necessary visual elements to provide the best context for answering the "
               "query: ",
    "PlotQA": "This query relates to retrieving a relevant plot or chart that visually represents "
              "numerical data. The retrieved figure should contain the necessary information to analyze "
              "trends, compare values, or extract key insights related to the query: ",
    "SlideVQA": "This query is related to retrieving a relevant presentation slide that visually presents "
                "structured information. The retrieved slide should contain the necessary text, charts, or "
                "graphics to provide the best answer to the query: ",
}
VISRAG_PAGE_PROMPTS = {
    "Textbooks": "A textbook page with structured educational content and explanations.",
    "ICML Papers": "A research paper from ICML, covering machine learning topics.",
    "NeurIPS Papers": "A research paper from NeurIPS on AI and ML topics.",
    "Manuallib": "A product manual page with technical specifications and instructions.",
    "InfoVQA": "An infographic with structured data, charts, and annotations.",
    "PlotQA": "A numerical data visualization, such as bar charts or line graphs.",
    "SlideVQA": "A presentation slide with text, bullet points, and diagrams.",
    "ArxivQA": "A figure from a research paper, including plots or experimental results.",
    "MP-DocVQA": "A page from a multi-page document with text or tables.",
    "ChartQA": "A statistical chart comparing values or analyzing trends.",
}


def visrag_join(prompt: str, text: str, token: str) -> str:
    """visrag_dataset.py's `process_query`: prompt, text and token joined by single spaces, the prompt left
    out when empty. Spaces are kept as it writes them: a query prompt ends in ": ", so two spaces precede the
    query, and an empty token or text leaves its space ("...the query:  Why? ", "...tables.  <|image_1|>")."""
    return f"{prompt} {text} {token}" if prompt else f"{text} {token}"


# ----------------------------------------------------------------------------- reading a row


def text_field(row: Mapping[str, Any], name: str) -> str:
    """A non-empty string column, or a BadRow naming it."""
    value = row.get(name)
    if not isinstance(value, str):
        raise BadRow(name, f"expected a string, found {type(value).__name__} {value!r:.40}", "bad_type")
    if not value.strip():
        raise BadRow(name, "empty", "empty_side")
    return value


def turns(row: Mapping[str, Any]) -> tuple[str, str]:
    """The first two turns' texts of a LLaVA-Hound row (the reference reads those two, whoever speaks)."""
    conversations = row.get("conversations")
    if hasattr(conversations, "tolist"):
        conversations = conversations.tolist()
    if not isinstance(conversations, list) or len(conversations) < 2:
        found = len(conversations) if isinstance(conversations, list) else type(conversations).__name__
        raise BadRow("conversations", f"expected a list of at least two turns, found {found}", "bad_turns")
    texts = []
    for index, turn in enumerate(conversations[:2]):
        value = turn.get("value") if isinstance(turn, Mapping) else None
        if not isinstance(value, str):
            raise BadRow(f"conversations[{index}].value", f"expected a string, found {turn!r:.60}",
                         "bad_turns")
        texts.append(value)
    return texts[0], texts[1]


def video_caption(row: Mapping[str, Any]) -> dict[str, Any]:
    """caption_retrieval: the first turn with the video token in place of `<video>` → the second turn."""
    question, answer = turns(row)
    return {"qry": question.replace(VIDEO_TOKEN, PLACEHOLDER), "qry_video_path": text_field(row, "video"),
            "pos_text": answer}


def video_retrieval(row: Mapping[str, Any]) -> dict[str, Any]:
    """video_retrieval: the second turn (a caption) under the query prompt → the video under the target
    prompt."""
    _, caption = turns(row)
    return {"qry": CAPTION_QUERY_PROMPT + caption, "pos_text": VIDEO_TARGET_PROMPT + PLACEHOLDER,
            "pos_video_path": text_field(row, "video")}


def video_qa(row: Mapping[str, Any]) -> dict[str, Any]:
    """llavahound_qa: the QA prompt, then the first turn with the video token in place of `<video>` → the
    second turn."""
    question, answer = turns(row)
    return {"qry": VIDEO_QA_PROMPT + question.replace(VIDEO_TOKEN, PLACEHOLDER),
            "qry_video_path": text_field(row, "video"), "pos_text": answer}


def colpali(row: Mapping[str, Any]) -> dict[str, Any]:
    """vidore: the image token, a space and the query (its `prompt` column is ignored) → the answer."""
    return {"qry": f"{PLACEHOLDER} {text_field(row, 'query')}", "qry_image_path": row.get("image"),
            "pos_text": row.get("answer")}


def visrag(row: Mapping[str, Any]) -> dict[str, Any]:
    """visrag: the query after its source's prompt (no image) → the page after its source's description."""
    source = row.get("source")
    query = visrag_join(VISRAG_QUERY_PROMPTS.get(source, ""), text_field(row, "query"), "")
    page = visrag_join(VISRAG_PAGE_PROMPTS.get(source, ""), "", PLACEHOLDER)
    return {"qry": query, "pos_text": page, "pos_image_path": row.get("image")}


@dataclass(frozen=True)
class V2Layout:
    """One of VLM2Vec-V2's training layouts, read by its parser's rule (`RowLayout`)."""

    name: str
    parser: str  # the reference's dataset_parser (and data_mode)
    build: Callable[[Mapping[str, Any]], dict[str, Any]]
    modality: Modality
    task: Task
    source: str  # the reference's key of the set in its training yaml
    columns: tuple[str, ...]  # required and read
    ignored_columns: tuple[str, ...]
    fields: Mapping[str, str]  # published field → the layout's field behind it
    refuses_unread: bool = False

    def description(self) -> dict[str, str]:
        return {"layout": self.name, "parser": self.parser}

    def known_columns(self) -> list[str]:
        return list(self.columns)

    def missing(self, names: Collection[str]) -> list[str]:
        return [name for name in self.columns if name not in names]

    def row(self, row: Mapping[str, Any], parse_list: Callable[..., list[Any]]) -> dict[str, Any]:
        return {**self.build(row), "modality": self.modality.value}

    def user_field(self, published_field: str) -> str:
        return self.fields.get(published_field, published_field)


_TURNS = ("video", "conversations")
_TURN_FIELDS = {"qry": "conversations[0].value", "qry_video_path": "video",
                "pos_text": "conversations[1].value"}
_COLPALI_EXTRA = ("image_filename", "source", "options", "page", "model", "prompt", "answer_type")
LAYOUTS: dict[str, V2Layout] = {layout.name: layout for layout in (
    V2Layout("vlm2vec-video-caption", "llavahound_caption/caption_retrieval", video_caption, Modality.V2T,
             Task.RETRIEVAL, "video_caption_300k", _TURNS, ("id",),
             _TURN_FIELDS),
    V2Layout("vlm2vec-video-retrieval", "llavahound_caption/video_retrieval", video_retrieval, Modality.T2V,
             Task.RETRIEVAL, "video_caption_300k-video", _TURNS, ("id",),
             {"qry": "conversations[1].value", "pos_video_path": "video"}),
    V2Layout("vlm2vec-video-qa", "llavahound_qa", video_qa, Modality.VT2T, Task.VQA, "video_qa_240k", _TURNS,
             ("id",),
             _TURN_FIELDS),
    V2Layout("vlm2vec-colpali", "vidore", colpali, Modality.IT2T, Task.VQA, "colpali_train_set",
             ("query", "image", "answer"), _COLPALI_EXTRA,
             {"qry": "query", "qry_image_path": "image", "pos_text": "answer"}),
    V2Layout("vlm2vec-visrag", "visrag", visrag, Modality.T2I, Task.RETRIEVAL, "visrag-indomain",
             ("query", "image", "source"), (), {"qry": "query", "pos_image_path": "image"}),
)}
