"""MMEB-V2 (78 data sets: 36 image, 18 video, 24 visual documents) scored as VLM2Vec's `eval.py` does.

What exists (model-free):
- `registry`: the 78 sets with modality, meta-task, `eval_type` (local / global), instructions and the
  hub annotations the reference loads; checked against VLM2Vec's eval yaml files and loaders.
- `metrics`: `RankingMetrics`' hit, recall, MRR and linear NDCG (graded) at 1/5/10, and candidate
  orders under this project's tie rules.
- `frames`: which pre-extracted frames a video contributes (`num_frames` evenly spaced, the reference's
  rounding, no padding).
- `aggregate`: per meta-task, per modality and Overall (means over data sets), and the leaderboard
  submission JSON of `report_score_v2.py`.
- `visdoc`: the BEIR sets (queries / corpus / qrels parquet and their page files, the layout fetch will
  write) read into a `RetrievalSet` with graded relevance; `global_candidates`, the reference's candidate
  deduplication by name, for every global set.
- `readers`: the 36 image sets (ziyjiang/MMEB_Test_Instruct rows + image-tasks/) and the 18 video sets
  (their annotation rows + the frames folders of the MMEB-V2 tarballs) read into `RetrievalSet`s, a video
  side being every frame of its folder (`ItemSpec.video`).

- `benchmark`: `MMEBV2`, the `Benchmark` behind `python -m mme5.eval --benchmark mmeb-v2` and the
  `MMEBV2Eval` callback: sets read through `READERS` (one entry per modality), graded scoring, summaries.

A root holding `sets.json` (`registry.load_v2_registry`) is scored as its own sets, each read by the loader of
the published set it names in `reads_as`: the demo world's `mmeb-v2/` (`mme5.demo.mmeb_v2`).
"""
