"""Training: the layer after data -> masking -> models, before eval and the pipelines.

``setup.setup_run`` prepares a run (seeds, threads, folder, data, device); ``loop.fit`` is the one
training loop over a ``loop.Task`` (``tasks.py``: pretraining, classification; ``segment.py``:
segmentation); ``stages.py`` holds the two stages every pipeline is made of (pretrain an encoder,
fine-tune it on labels: ``supervised_stage``). ``checkpoint``/``rundir``/``distributed``/``tracking``
are the run's files, RNG states, DDP collectives and TensorBoard. Map: docs/contracts.md.
"""
