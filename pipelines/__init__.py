"""Diffusers pipelines of medvlm (inference only); one pipeline per file, added by the pipelines issue."""
