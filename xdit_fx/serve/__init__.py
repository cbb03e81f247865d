"""`xdit-fx serve`: an OpenAI-compatible generation service over N ranks, with dynamic batching.

Rank 0 answers HTTP (app.py) and forms batches (batcher.py); every rank runs the same parallelized
pipeline (engine.py), driven by rank 0's broadcasts; server.py ties them together and cli.py launches the
ranks through torchrun's launcher. Only the public API is used: `xdit_fx.parallelize` and plan strings.
"""
