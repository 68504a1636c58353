"""pluggy markers for the ``trainyard`` project.

This module imports nothing but pluggy, so ``from trainyard import hookimpl`` in a
plugin never pulls in Ray or torch.
"""

import pluggy

PROJECT = "trainyard"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
