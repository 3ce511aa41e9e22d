"""The programs behind ``infer.py``: one module per model family, each with ``add_parser(subparsers)`` and ``run(args)``.

A module parses its flags (the shared inference vocabulary of ``utils/cli.py``), checks them against the loaded model
before anything is sampled, calls the sampling or enhancement function the training loop uses (in ``models/``), and
does the folder I/O: reading inputs, writing images, grids, CSVs and manifests. Models, samplers and objectives stay in
``models/``; nothing here is imported by a trainer's hot loop.
"""
