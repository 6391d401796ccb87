"""Evaluation of a merge: the merged model next to its parents and their ensemble, per task and jointly."""
