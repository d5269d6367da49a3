"""`make bench`: the pipeline side by side with in-process predict and with Celery chords (issue 5)."""
