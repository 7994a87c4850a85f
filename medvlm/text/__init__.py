"""Clinical text: de-identification, report parsing, structured prompts and text encoders."""
