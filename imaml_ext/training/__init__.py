"""The training command line (``imaml-train``, ``python -m imaml_ext.train``), one file per concern:

- ``arguments`` and ``config``: the options, and the run's configuration (``RunConfig``) with its checks;
- ``presets``: the iMAML paper's Omniglot and Mini-ImageNet settings (``--preset``), with their sources;
- ``run_folder``: the run folder (config, metrics, curves) and the checkpoints;
- ``tasks`` and ``learner``: the Omniglot or Mini-ImageNet tasks, the model and the learner that trains it;
- ``loop``: the training itself, read top to bottom;
- ``evaluation``: meta-test accuracy (results.json, ``--evaluate RUN_FOLDER``);
- ``distributed``, ``signals``, ``time_budget``: processes, SIGTERM/SIGINT and ``--time_budget``;
- ``errors``: ``RunError``, a refusal printed as one line.
"""
