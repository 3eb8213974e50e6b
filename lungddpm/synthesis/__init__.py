"""Synthesis runs (DESIGN §6): the lesion run (inpaint, paste back); the whole-volume run moves here later."""
