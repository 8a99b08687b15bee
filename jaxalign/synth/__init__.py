"""Synthetic data sets whose right answers are known, for tests, demos and benchmarks:
`tasks` (instruction tasks with exact answers; `task_eval` runs a model on them) and `prefs`
(preference pairs, or labelled unpaired rows for KTO, built on those tasks).

  python -m jaxalign.synth.tasks OUT_DIR --train 2000 --eval 200
  python -m jaxalign.synth.prefs OUT_DIR --train 2000 --eval 200 [--unpaired]
"""
