"""The stages, and what each hands the next. Read in this order:

    config.py      RunConfig: the one object a run is driven by, loaded from YAML + overrides and checked whole
                   (closed choices, ranges, presets, model keys, batch layout) before any work starts.
    storage.py     fsspec helpers: the same code for local folders, gs:// and memory://; atomic writes.
    lease.py       one writer per folder: the lease a command takes on the folder it writes (a training run, a
                   dataset, eval results), renewed by a heartbeat, taken over once it lapses.
    sources.py     the raw corpora (PG-19 books, ArXiv JSON lines, GitHub Parquet, plain files) cut into
                   units; unusable records become counted, listed skips.
    tokenizer.py   SentencePiece: trained on a hash-sampled part of the training split.
    prepare.py     `gss prepare`, a Ray Data job: units -> tokenized, packed Parquet shards.
    dataset.py     THE HAND-OFF: the dataset folder's identity, layout, manifest, shard writer and readers
                   (`TrainRows` for training, `eval_documents` for evaluation).
    backends.py    cpu / cuda / xla: device, wrapping (DDP, FSDP2, SPMD), autocast, syncs.
    checkpoint.py  what a training step leaves behind, when, and how it is read back (`gss eval` reads it too).
    train.py       `gss train`: the Ray Train worker loop and the driver around it.
    progress.py    what the terminal shows of a training run: the driver's bar (fed by MLflow), the workers' lines.
    registered_model.py  the model MLflow registers: a python_function logged as code, weights as tensors.
    evaluate.py    `gss eval`: perplexity against evaluation length, in pieces with the state carried, on
                   Scorer actors; and the validation of checkpoints during training.
    tracking.py    MLflow: the store of a command (`Tracking`), one run per stage, the names (`Tag`, the
                   registered model, its alias) by which the stages find each other's results and the queries
                   over them; the background logger of the training workers.
    logs.py        the terminal for people; the libraries' chatter to `<root>/logs/gss.log`.
    cluster.py     connecting to Ray, or starting a local cluster.
"""
