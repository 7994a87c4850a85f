"""Training stages of medvlm on accelerate; one stage per file, added by the training issue."""
