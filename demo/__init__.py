"""`make demo`: what pyemb does, run end to end (see run.py)."""
