"""Where users already train: callbacks for Hugging Face ``transformers.Trainer`` and ``lightning``.

    from chrono.integrations.transformers import ChronoCallback   # transformers.Trainer
    from chrono.integrations.lightning import ChronoCallback      # lightning.Trainer

Each submodule imports its framework (and torch) when imported; this package
itself imports nothing heavy, and ``chrono`` never imports it. The metric names
both callbacks add to the training logs are defined in ``.health``.
"""
