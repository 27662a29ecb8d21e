"""The procedural demo world behind `python -m mme5.demo`: scenes and their split (scenes), drawing
(render), multilingual texts (language), samples per task and modality (tasks), and the MMEB-eval and XTD10
layouts (mmeb, xtd); `world` builds it all. A package of its own, beside the training data package it writes
for: nothing in the library imports it."""
