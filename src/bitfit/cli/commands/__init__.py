"""Subcommands of the `bitfit` command line. Each module here registers itself with
``bitfit.cli.command``; this package imports them all."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
