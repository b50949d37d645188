"""One module per stage; each exposes ``STAGE`` (a :class:`cai.pipeline.StageSpec`)."""
