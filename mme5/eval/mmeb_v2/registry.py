"""The 78 data sets of MMEB-V2 (36 image, 18 video, 24 visual-document), as VLM2Vec evaluates them.

Read from TIGER-AI-Lab/VLM2Vec: the set names and `eval_type` from `experiments/public/eval/{image,video,
visdoc}.yaml`, the 78 that count and their modality from `experiments/report_score_v2.py`, the
instructions from the loaders `src/data/eval_dataset/*.py`, the annotation sources from
`src/constant/dataset_hf_path.py`. report_score_v2.py groups by modality only; the meta-task grouping is
the one papers' tables print (Image CLS/QA/RET/GD, Video CLS/QA/RET/MRET, VisDoc VDRv1/VDRv2/VR/OOD).

`eval_type`: "local" ranks each query against its own candidate list; "global" ranks it against every
distinct candidate of the set (deduplicated by candidate name), plus the corpus where the set has one.

Instructions: image sets carry theirs in the annotation rows (`qry_inst`/`tgt_inst` of
ziyjiang/MMEB_Test_Instruct): the registry repeats MMEB's query instruction for reading only. Video and
visdoc sets get theirs from the loader's constants, which the registry holds verbatim (trailing spaces
included). A target instruction of "" means the candidate text is encoded bare (labels, answer options).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mme5.eval.registry import MMEB, EvalSet, read_json_object

MODALITIES = ("image", "video", "visdoc")
EVAL_TYPES = ("local", "global")
META_TASKS = {
    "image": ("Image CLS", "Image QA", "Image RET", "Image GD"),
    "video": ("Video CLS", "Video QA", "Video RET", "Video MRET"),
    "visdoc": ("VisDoc VDRv1", "VisDoc VDRv2", "VisDoc VR", "VisDoc OOD"),
}
METRICS = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}  # report_score_v2.py


@dataclass(frozen=True)
class Annotations:
    """Where the reference loads a set's rows from: a hub data set, its split and config (None: the
    default one; MVBench reads one config per sub-task)."""

    repo: str
    split: str = "test"
    config: str | None = None


@dataclass(frozen=True)
class V2Set:
    name: str  # the yaml key, the name in report_score_v2.py and in the leaderboard JSON
    modality: str  # one of MODALITIES
    meta_task: str  # one of META_TASKS[modality]
    eval_type: str  # one of EVAL_TYPES
    query_instruction: str
    target_instruction: str
    annotations: Annotations
    reads_as: str = ""
    """The published set whose loader reads this one's rows (a registry of one's own, e.g. the demo
    world's, reuses the 78 loaders); "" for the 78 themselves."""

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"data set {self.name}: modality {self.modality!r} is not one of {MODALITIES}")
        if self.meta_task not in META_TASKS[self.modality]:
            raise ValueError(f"data set {self.name}: meta-task {self.meta_task!r} is not one of "
                             f"{META_TASKS[self.modality]}")
        if self.eval_type not in EVAL_TYPES:
            raise ValueError(f"data set {self.name}: eval_type {self.eval_type!r} is not one of {EVAL_TYPES}")

    @property
    def metric(self) -> str:
        return METRICS[self.modality]

    @property
    def loader(self) -> str:
        """The published set whose loader reads this set (its own name for the 78)."""
        return self.reads_as or self.name


# --- image: the 36 MMEB sets, all local, rows from ziyjiang/MMEB_Test_Instruct (one config per set) ---
_IMAGE_META = {"Classification": "Image CLS", "VQA": "Image QA", "Retrieval": "Image RET",
               "Grounding": "Image GD"}


def _image(s: EvalSet) -> V2Set:
    return V2Set(s.name, "image", _IMAGE_META[s.meta_task], "local", s.instruction, "",
                 Annotations("ziyjiang/MMEB_Test_Instruct", config=s.name))


# --- video: instructions of each loader (`video_classification_utils.DATASET_INSTRUCTION`, TASK_*) ---
_VIDEO_TARGET = "Understand the content of the provided video."
_VIDEO_QA = ("Given a video and a question, select the most accurate answer from the provided candidates. "
             "Return only the exact text of your chosen answer. Question: ")
_MOMENT = "Find the clip that corresponds to the described scene in the given video:"
MOMENTSEEKER_QUERY_INSTRUCTIONS = {
    # MomentSeeker's query is a text, a text + image, or a text + video segment: the instruction follows.
    "text": "Find the clip that corresponds to the given text:",
    "image": "Select the video clip that aligns with the given text and image:",
    "video": "Find the clip that corresponds to the given sentence and video segment:",
}


def _video(name: str, meta: str, eval_type: str, query: str, target: str, repo: str, split: str = "test",
           config: str | None = None) -> V2Set:
    return V2Set(name, "video", f"Video {meta}", eval_type, query, target, Annotations(repo, split, config))


_VIDEO = (
    _video("K700", "CLS", "global", "Recognize the category of the video content.", "",
           "VLM2Vec/Kinetics-700"),
    _video("SmthSmthV2", "CLS", "local", "What actions or object interactions are being performed by the "
           "person in the video?", "", "VLM2Vec/SmthSmthV2"),
    _video("HMDB51", "CLS", "global", "What actions or objects interactions are the person in the video "
           "doing?", "", "VLM2Vec/HMDB51"),
    _video("UCF101", "CLS", "global", "What activities or sports are being performed by the person in the "
           "video?", "", "VLM2Vec/UCF101"),
    _video("Breakfast", "CLS", "global", "Recognize the breakfast type that the person is cooking in the "
           "video. ", "", "VLM2Vec/Breakfast"),
    _video("MVBench", "QA", "local", _VIDEO_QA, "", "VLM2Vec/MVBench", split="train"),  # one config per task
    _video("Video-MME", "QA", "local", _VIDEO_QA, "", "VLM2Vec/Video-MME"),
    _video("NExTQA", "QA", "local", _VIDEO_QA, "", "VLM2Vec/NExTQA", config="MC"),
    _video("EgoSchema", "QA", "local", _VIDEO_QA, "", "VLM2Vec/EgoSchema", config="Subset"),
    _video("ActivityNetQA", "QA", "local", _VIDEO_QA, "", "VLM2Vec/ActivityNetQA"),
    _video("DiDeMo", "RET", "global", "Find a video that includes the following described scenes:",
           _VIDEO_TARGET, "VLM2Vec/DiDeMo"),
    _video("MSR-VTT", "RET", "global", "Find a video that contains the following visual content:",
           _VIDEO_TARGET, "VLM2Vec/MSR-VTT", config="test_1k"),
    _video("MSVD", "RET", "global", "Find the video snippet that corresponds to the given summary:",
           _VIDEO_TARGET, "VLM2Vec/MSVD"),
    _video("VATEX", "RET", "global", "Select a video that fits the description provided:", _VIDEO_TARGET,
           "VLM2Vec/VATEX"),
    _video("YouCook2", "RET", "global", "Find a video that demonstrates the following action while making "
           "a recipe:", _VIDEO_TARGET, "lmms-lab/YouCook2", split="val"),
    _video("QVHighlight", "MRET", "local", _MOMENT, _VIDEO_TARGET, "VLM2Vec/QVHighlight"),
    _video("Charades-STA", "MRET", "local", _MOMENT, _VIDEO_TARGET, "VLM2Vec/Charades-STA"),
    # Query instruction by query kind: MOMENTSEEKER_QUERY_INSTRUCTIONS; the video one is the common case.
    _video("MomentSeeker", "MRET", "local", MOMENTSEEKER_QUERY_INSTRUCTIONS["video"],
           "Understand the content of the provided video clip.", "VLM2Vec/MomentSeeker"),
)

# --- visual documents: all global over a BEIR corpus (configs queries / corpus / qrels) ---
_DOC_QUERY = "Find a document image that matches the given query:"
_DOC_TARGET = "Understand the content of the provided document image."


def _doc(name: str, meta: str, repo: str, split: str = "test") -> V2Set:
    return V2Set(name, "visdoc", f"VisDoc {meta}", "global", _DOC_QUERY, _DOC_TARGET,
                 Annotations(repo, split))


_VIDORE_V1 = {"arxivqa": "arxivqa_test_subsampled_beir", "docvqa": "docvqa_test_subsampled_beir",
              "infovqa": "infovqa_test_subsampled_beir", "tabfquad": "tabfquad_test_subsampled_beir",
              "tatdqa": "tatdqa_test_beir", "shiftproject": "shiftproject_test_beir"} | {
    f"syntheticDocQA_{topic}": f"syntheticDocQA_{topic}_test_beir"
    for topic in ("artificial_intelligence", "energy", "government_reports", "healthcare_industry")}

_VISDOC = (
    tuple(_doc(f"ViDoRe_{name}", "VDRv1", f"vidore/{repo}") for name, repo in _VIDORE_V1.items())
    # ViDoRe-v2: the leaderboard counts the human-labelled ESG set and the multilingual versions (queries in
    # every language) of the other three; the yaml's English-only variants (the reference filters the
    # queries to `language == "english"`) are not among the 78.
    + (_doc("ViDoRe_esg_reports_human_labeled_v2", "VDRv2", "vidore/esg_reports_human_labeled_v2"),)
    + tuple(_doc(f"ViDoRe_{name}_v2_multilingual", "VDRv2", f"vidore/{name}_v2")
            for name in ("biomedical_lectures", "economics_reports", "esg_reports"))
    + tuple(_doc(f"VisRAG_{name}", "VR", f"openbmb/VisRAG-Ret-Test-{name}", split="train")
            for name in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA"))
    # The page sets load the 2025-11 fixed annotations (VLM2Vec-V2 ViDoSeek-page 0.21 -> 0.80).
    + (_doc("ViDoSeek-page", "OOD", "VLM2Vec/ViDoSeek-page-fixed"),
       _doc("ViDoSeek-doc", "OOD", "VLM2Vec/ViDoSeek"),
       _doc("MMLongBench-page", "OOD", "VLM2Vec/MMLongBench-page-fixed"),
       _doc("MMLongBench-doc", "OOD", "VLM2Vec/MMLongBench-doc"))
)

MMEB_V2: tuple[V2Set, ...] = tuple(_image(s) for s in MMEB) + _VIDEO + _VISDOC


def sets_of(modality: str) -> tuple[V2Set, ...]:
    return tuple(s for s in MMEB_V2 if s.modality == modality)


REGISTRY_FILE = "sets.json"  # a root's own registry (the demo world's): then its sets, not the 78


def load_v2_registry(path: str | Path) -> tuple[V2Set, ...]:
    """A registry of one's own from JSON: {"<name>": {modality, meta_task, eval_type, query_instruction,
    target_instruction, annotations: {repo, split, config}, reads_as}}; `reads_as` must name one of the 78
    of the same modality (its loader reads the set)."""
    path = Path(path)
    entries = read_json_object(path, "the MMEB-V2 registry")
    published = {s.name: s for s in MMEB_V2}
    sets = []
    for name, entry in entries.items():
        try:
            fields = dict(entry, annotations=Annotations(**entry["annotations"]))
            spec = V2Set(name, **fields)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: data set {name!r}: {error}") from None
        if spec.loader not in published or published[spec.loader].modality != spec.modality:
            raise ValueError(f"{path}: data set {name!r}, field reads_as: {spec.reads_as!r} is not one of "
                             f"the 78 published {spec.modality} sets")
        sets.append(spec)
    return tuple(sets)


def save_v2_registry(sets: tuple[V2Set, ...] | list[V2Set], path: str | Path) -> None:
    payload = {s.name: {k: v for k, v in asdict(s).items() if k != "name"} for s in sets}
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def v2_registry_of(root: Path) -> tuple[V2Set, ...]:
    """`<root>/sets.json` when present, else the 78 data sets of MMEB-V2."""
    path = Path(root) / REGISTRY_FILE
    return load_v2_registry(path) if path.is_file() else MMEB_V2
