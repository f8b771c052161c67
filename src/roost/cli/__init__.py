"""The ``roost`` command: ``main.py`` parses and dispatches, one module per subcommand that is
only a command (``start``, ``passwd``, ``ctl``, ``operator``). ``roost bench`` and
``roost cluster`` live with the code they drive (``bench/``, ``cluster/dev.py``).
"""
