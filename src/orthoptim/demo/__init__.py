"""``orthoptim demo``: a small byte-level GPT trained with Hybrid, AdamW and torch.optim.Muon side by side.

``data`` (the built-in corpus and batches), ``model`` (the GPT), ``train`` (runs, table, plot) and ``cli`` (the
subcommand). Uses orthoptim's public API only.
"""
