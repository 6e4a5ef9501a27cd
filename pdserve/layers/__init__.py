"""Building blocks of the models: norms, rotary embedding, MLP activation, attention backends, sampler."""
