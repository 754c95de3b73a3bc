"""The training command line (``imaml-train``, ``python -m imaml_ext.train``), one file per concern:

- ``arguments``: the options and presets' parse into the run's configuration;
- ``config``: ``RunConfig``, one typed field per option, its checks, and what a run records of it;
- ``presets``: the iMAML paper's Omniglot and Mini-ImageNet settings (``--preset``), with their sources;
- ``run_folder``: the run folder (config, metrics, curves) and the checkpoint files;
- ``tasks`` and ``learner``: the Omniglot or Mini-ImageNet tasks, the model and the learner that trains it;
- ``loop``: the training recipe, read top to bottom, with ``checkpointing`` (what a checkpoint holds and
  puts back), ``window`` (the log window's sums and rows) and ``metrics_log`` (the rows written and shown);
- ``evaluation``: meta-test accuracy (results.json, ``--evaluate RUN_FOLDER``);
- ``distributed``, ``signals``, ``time_budget``: processes, SIGTERM/SIGINT and ``--time_budget``;
- ``errors``: ``RunError``, a refusal printed as one line.
"""
