"""Judging a trained generator: metrics (:mod:`.metrics`), plots (:mod:`.plots`) and the run's
report that assembles both (:mod:`.report`)."""
