"""The procedural demo world behind `python -m mme5.data.demo_world`: scenes and their split (scenes), drawing
(render), multilingual texts (language), samples per task and modality (tasks), and the MMEB-eval and XTD10
layouts (mmeb, xtd)."""
