"""Evaluation of a merge: the merged model next to its parents and their ensemble, per task and jointly.

`harness.evaluate_merge` runs the pipeline; `tasks` (which data scores which task, the joint label space),
`batches` (test data), `scorers`, `metrics` and `results` each do one step; `names` holds the light constants;
`decision` is the public joint rule of a concatenated head (`hf_mudsc.joint_probabilities`).
"""
